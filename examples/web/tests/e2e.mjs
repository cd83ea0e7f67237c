#!/usr/bin/env node
// Drive the page in a headless Chromium: load it, give it images through the file input, read what it shows.
// Used by tests/test_embedding.py, which serves the page and compares the answers with cifar-infer's.
//
//   node tests/e2e.mjs --url http://127.0.0.1:8000/index.html --screenshot shot.png a.png b.jpg
//
// Prints one JSON object per image: { image, top: [{ label, probability }], input: base64 of the model's
// uint8 input, probabilities }. Uses a browser already on the machine (playwright-core downloads none):
// --chromium, else $CHROMIUM, else /usr/bin/chromium (Debian's package).

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import process from 'node:process';
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

const { values: opts, positionals: images } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: 'string' },
    chromium: { type: 'string', default: process.env.CHROMIUM ?? '/usr/bin/chromium' },
    screenshot: { type: 'string' },
    timeout: { type: 'string', default: '60000' }, // ms, for each step
  },
});
if (!opts.url || images.length === 0) {
  process.stderr.write('usage: node tests/e2e.mjs --url URL [--screenshot PNG] [--chromium PATH] IMAGE...\n');
  process.exit(2);
}
const timeout = Number(opts.timeout);

// A fresh profile, and nothing that reaches out to the network on its own: the machine may be offline.
const profile = mkdtempSync(path.join(tmpdir(), 'cifarkit-chromium-'));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: opts.chromium,
  headless: true,
  viewport: { width: 960, height: 820 },
  args: [
    '--headless',
    '--no-sandbox', // root in a container: Chromium's sandbox needs user namespaces it may not have
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  timeout,
});

try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  page.setDefaultTimeout(timeout);
  const logs = [];
  page.on('console', (m) => logs.push(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => logs.push(`request failed: ${r.url()} (${r.failure()?.errorText})`));

  await page.goto(opts.url);
  try {
    await page.waitForSelector('#model[data-state="ready"]');
  } catch (err) {
    const status = await page.textContent('#model-status').catch(() => '?');
    throw new Error(`the model did not load: ${status}\n${logs.join('\n')}`);
  }

  for (const image of images) {
    const name = path.basename(image);
    await page.setInputFiles('#image-input', image);
    // The result names its image: wait for this image's answer, not the previous one's.
    await page.waitForFunction(
      (n) => {
        const r = document.getElementById('result');
        return r.dataset.image === n && r.dataset.state === 'done' && window.cifarkitDemo?.image === n;
      },
      name,
    ).catch(async (err) => {
      const error = await page.textContent('#error').catch(() => '');
      throw new Error(`no result for ${name}: ${error || err.message}\n${logs.join('\n')}`);
    });
    const shown = await page.$$eval('#predictions li', (lis) =>
      lis.map((li) => ({ label: li.dataset.label, probability: Number(li.dataset.probability), text: li.innerText })),
    );
    const demo = await page.evaluate(() => ({
      input: btoa(String.fromCharCode(...window.cifarkitDemo.input)),
      probabilities: window.cifarkitDemo.probabilities,
    }));
    process.stdout.write(`${JSON.stringify({ image, top: shown, ...demo })}\n`);
  }
  if (opts.screenshot) {
    await page.screenshot({ path: opts.screenshot, fullPage: true });
    process.stderr.write(`screenshot: ${opts.screenshot}\n`);
  }
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
