// cifarkit.js: read a cifarkit model.onnx's own metadata and preprocess pixels exactly like `cifar-infer`.
//
// One dependency-free ES module for every JavaScript host: the Node example (examples/node) and the web page
// (examples/web) carry byte-identical copies, and tests/test_embedding.py checks that they stay identical.
//
//   import { readOnnxMetadata, parseArtifactMeta, preprocessPixels, topK } from './cifarkit.js';
//   const meta = parseArtifactMeta(readOnnxMetadata(modelBytes));   // class names, image size, resize rule
//   const input = preprocessPixels(pixels, width, height, channels, meta);  // Uint8Array [H*W*3], RGB
//
// The preprocessing rule (src/cifarkit/preprocess.py is the reference; apply EXIF orientation before this):
//   1. to 8-bit RGB: grey is replicated, alpha is composited on white with Pillow's integer arithmetic;
//   2. if the image is not already H x W: take the source box of `resize_mode` ("center_crop": the largest
//      centred region with the target's aspect ratio; "squash": the whole image) and resize it with Pillow's
//      antialiased separable convolution (same coefficients, same 22-bit fixed point, same rounding), so the
//      pixels equal Pillow's bit for bit. A 32x32 image reaches the model untouched.

// ---------------------------------------------------------------------------------------------------------
// ONNX metadata: a minimal protobuf reader for ModelProto.metadata_props
// ---------------------------------------------------------------------------------------------------------

// Field numbers from onnx/onnx.proto: ModelProto.metadata_props = 14 (repeated StringStringEntryProto),
// StringStringEntryProto.key = 1, .value = 2. onnxruntime-node and onnxruntime-web do not expose custom
// metadata (their InferenceSession has inputNames/outputNames only), so we read it from the file ourselves.
const MODEL_METADATA_PROPS = 14;
const ENTRY_KEY = 1;
const ENTRY_VALUE = 2;

const WIRE_VARINT = 0;
const WIRE_FIXED64 = 1;
const WIRE_LEN = 2;
const WIRE_FIXED32 = 5;

function readVarint(buf, pos) {
  // Multiplication instead of shifts: lengths of large models exceed 2^31, and doubles are exact to 2^53.
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i++) {
    if (pos >= buf.length) throw new Error('truncated protobuf varint');
    const byte = buf[pos++];
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return [value, pos];
    scale *= 128;
  }
  throw new Error('malformed protobuf varint');
}

// Calls visit(fieldNumber, wireType, start, end) for each top-level field of the message in buf[start:end).
function forEachField(buf, start, end, visit) {
  let pos = start;
  while (pos < end) {
    let tag;
    [tag, pos] = readVarint(buf, pos);
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    let fieldStart = pos;
    if (wire === WIRE_VARINT) {
      [, pos] = readVarint(buf, pos);
    } else if (wire === WIRE_FIXED64) {
      pos += 8;
    } else if (wire === WIRE_FIXED32) {
      pos += 4;
    } else if (wire === WIRE_LEN) {
      let len;
      [len, pos] = readVarint(buf, pos);
      fieldStart = pos;
      pos += len;
    } else {
      throw new Error(`unsupported protobuf wire type ${wire} (field ${field}): not an ONNX model?`);
    }
    if (pos > end) throw new Error('truncated protobuf message: not an ONNX model, or an incomplete file?');
    visit(field, wire, fieldStart, pos);
  }
}

/** ONNX model bytes (Uint8Array / Buffer) -> { key: value } of ModelProto.metadata_props, strings as stored. */
export function readOnnxMetadata(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const utf8 = new TextDecoder('utf-8');
  const props = {};
  forEachField(buf, 0, buf.length, (field, wire, start, end) => {
    if (field !== MODEL_METADATA_PROPS || wire !== WIRE_LEN) return;
    let key = '';
    let value = '';
    forEachField(buf, start, end, (f, w, s, e) => {
      if (w !== WIRE_LEN) return;
      if (f === ENTRY_KEY) key = utf8.decode(buf.subarray(s, e));
      else if (f === ENTRY_VALUE) value = utf8.decode(buf.subarray(s, e));
    });
    props[key] = value;
  });
  return props;
}

/** metadata_props -> the fields a host needs, parsed as cifarkit.spec.ArtifactMeta.to_props() wrote them. */
export function parseArtifactMeta(props) {
  const need = (key) => {
    if (!(key in props)) {
      throw new Error(`model metadata has no '${key}': not a cifarkit model.onnx (export it with cifar-export)`);
    }
    return props[key];
  };
  const json = (key, fallback) => {
    if (!(key in props)) return fallback;
    try {
      return JSON.parse(props[key]);
    } catch {
      throw new Error(`model metadata '${key}' is not valid JSON: ${props[key].slice(0, 60)}`);
    }
  };
  const schema = need('schema');
  if (schema !== 'cifarkit.artifact/1') throw new Error(`model metadata schema is '${schema}', expected 'cifarkit.artifact/1'`);
  const classNames = JSON.parse(need('class_names'));
  if (!Array.isArray(classNames) || classNames.length < 2) throw new Error("model metadata 'class_names' must list at least 2 classes");
  const imageSize = json('image_size', [32, 32]); // [height, width]
  const resizeMode = props.resize_mode ?? 'center_crop';
  if (!['center_crop', 'squash'].includes(resizeMode)) throw new Error(`unknown resize_mode '${resizeMode}'`);
  const resizeFilter = props.resize_filter ?? 'bilinear';
  if (!(resizeFilter in FILTERS)) throw new Error(`unsupported resize_filter '${resizeFilter}'`);
  return {
    classNames,
    modelName: need('model_name'),
    imageSize,
    resizeMode,
    resizeFilter,
    inputName: props.input_name ?? 'images',
    outputNames: json('output_names', ['logits', 'probabilities']),
    testAccuracy: json('test_accuracy', null), // fraction in [0, 1], or null
    tta: props.tta ?? 'none',
    props,
  };
}

// ---------------------------------------------------------------------------------------------------------
// Preprocessing: Pillow's to_rgb + crop box + antialiased resample, bit-exact
// ---------------------------------------------------------------------------------------------------------

/** Any 1-4 channel 8-bit pixels (grey, grey+alpha, RGB, RGBA) -> RGB; alpha composited on white. */
export function toRgb(pixels, width, height, channels) {
  const n = width * height;
  if (channels === 3) return pixels instanceof Uint8Array ? pixels : new Uint8Array(pixels);
  const out = new Uint8Array(n * 3);
  const hasAlpha = channels === 2 || channels === 4;
  for (let i = 0; i < n; i++) {
    const p = i * channels;
    let r;
    let g;
    let b;
    if (channels <= 2) {
      r = g = b = pixels[p];
    } else {
      r = pixels[p];
      g = pixels[p + 1];
      b = pixels[p + 2];
    }
    if (hasAlpha) {
      const a = pixels[p + channels - 1];
      if (a === 0) {
        r = g = b = 255;
      } else if (a !== 255) {
        // Pillow's ImagingAlphaComposite (7 precision bits, rounded division by 255) with a white,
        // opaque destination, where its coefficients reduce to coef1 = a * 128, coef2 = (255 - a) * 128.
        const c1 = a * 128;
        const c2 = (255 - a) * 128;
        const blend = (s) => {
          const t = s * c1 + 255 * c2 + (0x80 << 7);
          return (((t >> 8) + t) >> 8) >> 7;
        };
        r = blend(r);
        g = blend(g);
        b = blend(b);
      }
    }
    out[i * 3] = r;
    out[i * 3 + 1] = g;
    out[i * 3 + 2] = b;
  }
  return out;
}

/** cifarkit.preprocess.crop_box: the source region [left, top, right, bottom] that `mode` maps to [th, tw]. */
export function cropBox(width, height, [th, tw], mode) {
  if (mode === 'squash') return [0, 0, width, height];
  if (mode !== 'center_crop') throw new Error(`resize mode must be center_crop or squash, got '${mode}'`);
  if (width * th > height * tw) {
    const cw = (height * tw) / th; // wider than the target: cut the sides
    const left = (width - cw) / 2;
    return [left, 0, left + cw, height];
  }
  const ch = (width * th) / tw; // taller (or equal): cut top and bottom
  const top = (height - ch) / 2;
  return [0, top, width, top + ch];
}

// Pillow's filters (src/libImaging/Resample.c): weight function and support in source pixels at scale 1.
const FILTERS = {
  box: { support: 0.5, f: (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0) },
  bilinear: {
    support: 1.0,
    f: (x) => {
      x = Math.abs(x);
      return x < 1.0 ? 1.0 - x : 0.0;
    },
  },
  bicubic: {
    support: 2.0,
    f: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
  },
  lanczos: {
    support: 3.0,
    f: (x) => {
      const sinc = (v) => (v === 0.0 ? 1.0 : Math.sin(v * Math.PI) / (v * Math.PI));
      return x >= -3.0 && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0;
    },
  },
};

const PRECISION_BITS = 32 - 8 - 2; // Pillow's fixed point for 8-bit images
const HALF = 1 << (PRECISION_BITS - 1);
const ONE = 1 << PRECISION_BITS;

// Pillow's precompute_coeffs + normalize_coeffs_8bpc. Box edges are C floats in Pillow (Python passes the
// box as "(ffff)"), hence Math.fround; everything else is double, as in C.
function coefficients(inSize, in0, in1, outSize, filter) {
  in0 = Math.fround(in0);
  in1 = Math.fround(in1);
  const scale = Math.fround(in1 - in0) / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const kk = new Int32Array(outSize * ksize);
  const bounds = new Int32Array(outSize * 2);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      w[x] = filter.f((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0.0 ? w[x] / ww : w[x];
      kk[xx * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * ONE : 0.5 + k * ONE);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, kk, bounds };
}

function clip8(v) {
  if (v >= ONE * 256) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / ONE);
}

// One separable pass (Pillow's ImagingResampleHorizontal_8bpc / ImagingResampleVertical_8bpc) on RGB rows:
// along x when `alongX`, else along y; reads rows [rowOffset, rowOffset + outRows) of `src` when along x.
function pass(src, srcW, outW, outH, coeffs, alongX, rowOffset = 0) {
  const { ksize, kk, bounds } = coeffs;
  const out = new Uint8Array(outW * outH * 3);
  for (let yy = 0; yy < outH; yy++) {
    for (let xx = 0; xx < outW; xx++) {
      const j = alongX ? xx : yy;
      const min = bounds[j * 2];
      const n = bounds[j * 2 + 1];
      const k = j * ksize;
      let s0 = HALF;
      let s1 = HALF;
      let s2 = HALF;
      for (let i = 0; i < n; i++) {
        const p = alongX ? ((yy + rowOffset) * srcW + i + min) * 3 : ((i + min) * srcW + xx) * 3;
        const c = kk[k + i];
        s0 += src[p] * c;
        s1 += src[p + 1] * c;
        s2 += src[p + 2] * c;
      }
      const o = (yy * outW + xx) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

/** RGB [height, width, 3] -> RGB [th, tw, 3] from source `box` (floats), as Pillow's Image.resize(box=...). */
export function resizeRgb(rgb, width, height, box, tw, th, filterName = 'bilinear') {
  const filter = FILTERS[filterName];
  if (!filter) throw new Error(`unsupported resize filter '${filterName}'`);
  // Pillow's ImagingResampleInner: skip a pass that would change nothing.
  const needH = tw !== width || box[0] !== 0 || box[2] !== tw;
  const needV = th !== height || box[1] !== 0 || box[3] !== th;
  const horiz = coefficients(width, box[0], box[2], tw, filter);
  const vert = coefficients(height, box[1], box[3], th, filter);
  // Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks by more than
  // twice as many pixels as the width does (sizes of the whole image, not of the box). The 8-bit rounding
  // between the passes makes the order visible in the pixels, so follow it. Measured against Pillow 13.0:
  // tests/test_embedding.py compares this function with Pillow on random sizes, boxes and filters.
  const verticalFirst = needH && needV && th < height && 2 * (width - tw) < height - th;
  if (verticalFirst) {
    const tmp = pass(rgb, width, width, th, vert, false);
    return pass(tmp, width, tw, th, horiz, true);
  }
  let src = rgb;
  let srcW = width;
  if (needH) {
    // Only the rows that the vertical pass will read, as Pillow does (the values do not depend on it).
    const first = vert.bounds[0];
    const last = vert.bounds[th * 2 - 2] + vert.bounds[th * 2 - 1];
    for (let i = 0; i < th; i++) vert.bounds[i * 2] -= first;
    src = pass(rgb, width, tw, last - first, horiz, true, first);
    srcW = tw;
  }
  return needV ? pass(src, srcW, srcW, th, vert, false) : src;
}

/** Decoded, EXIF-oriented 8-bit pixels -> the model's input for one image: Uint8Array [H * W * 3], RGB. */
export function preprocessPixels(pixels, width, height, channels, meta) {
  const [th, tw] = meta.imageSize;
  const rgb = toRgb(pixels, width, height, channels);
  if (width === tw && height === th) return rgb; // a 32x32 CIFAR image passes pixel for pixel
  const box = cropBox(width, height, [th, tw], meta.resizeMode);
  return resizeRgb(rgb, width, height, box, tw, th, meta.resizeFilter);
}

/** One image's probabilities -> [{ index, label, probability }], the `k` most likely first. Ranked by `scores`
 *  (pass the logits, as cifar-infer ranks: softmax can round two close logits to one probability); ties go to
 *  the lower index, as numpy's argmax. */
export function topK(probabilities, classNames, k, scores = probabilities) {
  const order = Array.from(probabilities, (_, i) => i).sort((a, b) => scores[b] - scores[a] || a - b);
  return order.slice(0, k).map((i) => ({ index: i, label: classNames[i], probability: probabilities[i] }));
}
