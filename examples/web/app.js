// The page's logic: load model.onnx, decode a dropped image with the browser, preprocess it exactly as
// cifar-infer does (cifarkit.js), run onnxruntime-web, show the top 3 labels.

import * as ort from 'onnxruntime-web';

import { parseArtifactMeta, preprocessPixels, readOnnxMetadata, topK } from './cifarkit.js';

// A plain static server does not send the COOP/COEP headers that multi-threaded WebAssembly needs
// (SharedArrayBuffer), so ask for one thread instead of letting onnxruntime warn and fall back.
ort.env.wasm.numThreads = 1;
// The .wasm file lies beside the bundle in node_modules; say so explicitly rather than rely on the default.
ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;

const MAX_PIXELS = 89_478_485; // cifarkit.preprocess.MAX_PIXELS: a larger image is refused
const TOP = 3;

const $ = (id) => document.getElementById(id);
let model = null; // { session, meta, name }
let pending = null; // a File dropped before the model was ready

// ---------------------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------------------

async function loadModel(bytes, name) {
  const meta = parseArtifactMeta(readOnnxMetadata(bytes));
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'] });
  model = { session, meta, name };
  const acc = meta.testAccuracy == null ? '' : ` · ${(100 * meta.testAccuracy).toFixed(1)}% test accuracy`;
  const [h, w] = meta.imageSize;
  $('model-status').textContent = `Model ${meta.modelName} (${name}) · ${meta.classNames.length} classes · ${h}×${w} input${acc}`;
  $('model').dataset.state = 'ready';
  $('input-size').textContent = `${h}×${w}`;
  if (pending) classify(pending);
}

async function loadModelFromUrl(url) {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new Error(`cannot fetch ${url} (${err.message})`);
  }
  if (!response.ok) throw new Error(`no model at ${url} (HTTP ${response.status}); choose a model.onnx file`);
  await loadModel(new Uint8Array(await response.arrayBuffer()), url.split('/').pop());
}

function modelFailed(err) {
  model = null;
  $('model').dataset.state = 'error';
  $('model-status').textContent = `No model loaded: ${err.message}`;
}

// ---------------------------------------------------------------------------------------------------------
// Image -> pixels -> prediction
// ---------------------------------------------------------------------------------------------------------

/** A File -> RGBA pixels as decoded by the browser, EXIF orientation applied, no colour management. */
async function decode(file) {
  // colorSpaceConversion 'none': the stored values, as Pillow reads them (no ICC profile applied);
  // premultiplyAlpha 'none' keeps semi-transparent pixels as close to the file as a canvas allows.
  const bitmap = await createImageBitmap(file, {
    imageOrientation: 'from-image',
    colorSpaceConversion: 'none',
    premultiplyAlpha: 'none',
  });
  const { width, height } = bitmap;
  if (width * height > MAX_PIXELS) {
    bitmap.close();
    throw new Error(`${width}×${height} pixels is over the ${MAX_PIXELS.toLocaleString('en')} pixel limit`);
  }
  const canvas = document.createElement('canvas');
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext('2d', { willReadFrequently: true, colorSpace: 'srgb' });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  return { rgba: ctx.getImageData(0, 0, width, height, { colorSpace: 'srgb' }).data, width, height };
}

async function classify(file) {
  if (!model) {
    pending = file; // classified as soon as the model is ready
    return;
  }
  pending = null;
  const { session, meta } = model;
  const [h, w] = meta.imageSize;
  $('drop-zone').dataset.state = 'busy';
  $('result').dataset.state = 'busy';
  showError('');
  showPreview(file);
  try {
    const t0 = performance.now();
    const { rgba, width, height } = await decode(file);
    const input = preprocessPixels(rgba, width, height, 4, meta); // Uint8Array [H * W * 3]
    const feeds = { [meta.inputName]: new ort.Tensor('uint8', input, [1, h, w, 3]) };
    const out = await session.run(feeds);
    const probabilities = out[meta.outputNames[1]].data; // Float32Array [C]
    const ms = performance.now() - t0;
    showPredictions(topK(probabilities, meta.classNames, TOP), file.name, `${width}×${height} image, ${ms.toFixed(0)} ms.`);
    showModelInput(input, w, h);
    // For tests and the curious: the exact model input and output of the last image.
    window.cifarkitDemo = { input, probabilities: Array.from(probabilities), image: file.name, width, height };
  } catch (err) {
    // No stale answer beside an image that could not be read: the error line says it all.
    $('result').dataset.state = 'error';
    $('result').hidden = true;
    showError(`${file.name}: cannot classify this file (${err.message || err}).`);
  } finally {
    $('drop-zone').dataset.state = 'idle';
  }
}

// ---------------------------------------------------------------------------------------------------------
// Showing things
// ---------------------------------------------------------------------------------------------------------

function showPreview(file) {
  const img = $('preview');
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  // A CIFAR-sized image blown up smoothly is a blur: show small images with crisp pixels instead.
  img.onload = () => (img.style.imageRendering = img.naturalWidth <= 128 ? 'pixelated' : 'auto');
  $('image-name').textContent = file.name;
  $('result').hidden = false;
}

function showPredictions(ranked, name, timing) {
  const list = $('predictions');
  list.replaceChildren(
    ...ranked.map(({ label, probability, index }, rank) => {
      const li = document.createElement('li');
      li.dataset.label = label;
      li.dataset.index = String(index);
      li.dataset.probability = String(probability);
      if (rank === 0) li.className = 'top';
      const pct = `${(100 * probability).toFixed(1)}%`;
      li.innerHTML = `<span class="label"></span><span class="pct">${pct}</span><span class="bar"><span style="width:${Math.max(0.5, 100 * probability).toFixed(1)}%"></span></span>`;
      li.querySelector('.label').textContent = label;
      return li;
    }),
  );
  $('timing').textContent = timing;
  $('result').dataset.image = name;
  $('result').dataset.state = 'done';
}

function showModelInput(rgb, w, h) {
  const canvas = $('model-input');
  canvas.width = w;
  canvas.height = h;
  const rgba = new Uint8ClampedArray(w * h * 4);
  for (let i = 0; i < w * h; i++) {
    rgba.set(rgb.subarray(i * 3, i * 3 + 3), i * 4);
    rgba[i * 4 + 3] = 255;
  }
  canvas.getContext('2d').putImageData(new ImageData(rgba, w, h), 0, 0);
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

// ---------------------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------------------

/** The first file, if it may be an image (an empty type: the browser does not know; let the decoder try). */
function takeImage(files) {
  const file = files?.[0];
  if (!file) return;
  if (file.type && !file.type.startsWith('image/')) showError(`${file.name} is not an image (${file.type}).`);
  else classify(file);
}

$('image-input').addEventListener('change', (e) => {
  takeImage(e.target.files);
  e.target.value = ''; // choosing the same file again classifies it again
});

const zone = $('drop-zone');
for (const type of ['dragenter', 'dragover']) {
  zone.addEventListener(type, (e) => {
    e.preventDefault();
    zone.dataset.state = 'over';
  });
}
zone.addEventListener('dragleave', () => (zone.dataset.state = 'idle'));
zone.addEventListener('drop', (e) => {
  e.preventDefault();
  zone.dataset.state = 'idle';
  takeImage(e.dataTransfer?.files);
});
document.addEventListener('paste', (e) => takeImage(e.clipboardData?.files));

$('model-file').addEventListener('change', async (e) => {
  const file = e.target.files?.[0];
  if (!file) return;
  $('model').dataset.state = 'loading';
  $('model-status').textContent = `Loading ${file.name}…`;
  try {
    await loadModel(new Uint8Array(await file.arrayBuffer()), file.name);
  } catch (err) {
    modelFailed(err);
  }
});

const modelUrl = new URLSearchParams(location.search).get('model') ?? 'model.onnx';
loadModelFromUrl(modelUrl).catch(modelFailed);
