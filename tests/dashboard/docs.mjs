// Renders the hub's API docs in headless Debian Chromium with no network but the hub: every
// request to another origin is blocked (and counted as a failure), so the pages must get all
// their scripts, styles and the OpenAPI document from the hub itself.
//
// Run by tests/tests/docs_ui.rs (which starts a real hub). Environment:
//   APEX_URL         hub base URL, e.g. http://127.0.0.1:8088 (required)
//   APEX_API_KEY     an API key of that hub (required): Swagger UI's "Try it out" uses it
//   APEX_SCREENSHOT  where to save the Swagger UI screenshot (default target/docs.png); ReDoc's
//                    goes next to it (-redoc.png)
//   CHROMIUM         browser binary (default /usr/bin/chromium)
//
// Checks:
//   - /docs redirects to /docs/ and Swagger UI shows the operations (an element for
//     GET /api/v1/tasks, dozens of operations, the tags), with no page or console error;
//   - "Try it out" on GET /api/v1/tasks, authorized with the key, gets 200 from the hub;
//   - /redoc renders the same document (the task operations, the ErrorBody schema), no error.
// Prints `STEP <name>` lines and `DOCS OK` at the end; exits 1 with the reason otherwise.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = required('APEX_URL').replace(/\/$/, '');
const KEY = required('APEX_API_KEY');
const SHOT = process.env.APEX_SCREENSHOT || 'target/docs.png';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 60_000;

function required(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return v;
}

const step = (name) => console.log(`STEP ${name}`);
const shotPath = (suffix) => SHOT.replace(/\.png$/, '') + suffix + '.png';

function expect(cond, msg) {
  if (!cond) throw new Error(`expectation failed: ${msg}`);
}

const profile = mkdtempSync(join(tmpdir(), 'apex-docs-chromium-'));
mkdirSync(dirname(SHOT), { recursive: true });
let context;
let page;
const problems = [];
const served = new Set();

try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
    ],
    viewport: { width: 1440, height: 900 },
    deviceScaleFactor: 1,
  });
  // No network but the hub: anything else is aborted and reported.
  const origin = new URL(BASE).origin;
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (url.startsWith(origin + '/')) {
      served.add(new URL(url).pathname);
      return route.continue();
    }
    problems.push(`blocked a request off the hub: ${url}`);
    return route.abort('blockedbyclient');
  });
  page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // ReDoc 2's "powered by" logo comes from its CDN: the hub's CSP refuses it in the browser
    // (no request is made) and the image hides itself. Any other console error is a failure.
    const text = m.text();
    const cspLogo = text.includes("'https://cdn.redoc.ly/redoc/logo-mini.svg'")
      && text.includes('Content Security Policy');
    if (m.type() === 'error' && !cspLogo) problems.push(`console error: ${text}`);
  });

  // ---- Swagger UI --------------------------------------------------------------------------
  const resp = await page.goto(`${BASE}/docs`);
  expect(resp.status() === 200, `/docs answered ${resp.status()}`);
  expect(new URL(page.url()).pathname === '/docs/', `/docs landed on ${page.url()}`);
  const tasksOp = page.locator('.opblock-summary-path[data-path="/api/v1/tasks"]').first();
  await tasksOp.waitFor({ state: 'visible' });
  const ops = await page.locator('.opblock').count();
  expect(ops >= 50, `Swagger UI shows ${ops} operations`);
  for (const tag of ['tasks', 'nodes', 'llm', 'channels', 'docs']) {
    expect(await page.locator(`.opblock-tag[data-tag="${tag}"]`).count() === 1, `no tag section ${tag}`);
  }
  const title = await page.locator('.info .title').textContent();
  expect(/apex hub/.test(title), `title: ${title}`);
  expect(served.has('/openapi.json'), 'Swagger UI did not load /openapi.json from the hub');
  step(`swagger-rendered ${ops} operations`);

  // Authorize with the key, then run GET /api/v1/tasks from the page.
  await page.click('button.authorize');
  const dialog = page.locator('.dialog-ux');
  await dialog.locator('input[type="text"], input[type="password"]').first().fill(KEY);
  await dialog.locator('button.authorize').first().click();
  await dialog.locator('button.close-modal').first().click();
  const listOp = page.locator('#operations-tasks-listTasks');
  await listOp.locator('.opblock-summary').click();
  // The hub turns "Try it out" on (`tryItOutEnabled`): the Execute button is there at once.
  await listOp.locator('button.execute').click();
  const status = listOp.locator('.live-responses-table tr.response .response-col_status').first();
  await status.waitFor({ state: 'visible' });
  const code = (await status.textContent()).trim();
  expect(code.startsWith('200'), `Try it out on GET /api/v1/tasks answered ${code}`);
  step('swagger-try-it-out 200');
  await page.screenshot({ path: SHOT, fullPage: false });

  // ---- ReDoc -------------------------------------------------------------------------------
  served.clear();
  const r2 = await page.goto(`${BASE}/redoc`);
  expect(r2.status() === 200, `/redoc answered ${r2.status()}`);
  await page.waitForFunction(
    () => document.querySelector('redoc .api-content, .api-content') !== null
      && document.body.innerText.includes('/api/v1/tasks/batch'),
    null,
    { timeout: TIMEOUT },
  );
  const text = await page.evaluate(() => document.body.innerText);
  expect(!/something went wrong|error downloading/i.test(text), 'ReDoc shows an error');
  for (const want of ['apex hub', 'ErrorBody', '/v1/chat/completions', '/api/admin/nodes']) {
    expect(text.includes(want), `ReDoc does not show ${want}`);
  }
  expect(served.has('/redoc/redoc.standalone.js') && served.has('/openapi.json'),
    `ReDoc's script and document were not loaded from the hub: ${[...served].join(', ')}`);
  step('redoc-rendered');
  await page.screenshot({ path: shotPath('-redoc'), fullPage: false });

  expect(problems.length === 0, `problems seen:\n  ${problems.join('\n  ')}`);
  console.log(`DOCS OK screenshot=${SHOT}`);
} catch (e) {
  console.error(`DOCS FAILED: ${e.message}`);
  if (problems.length) console.error(`also seen:\n  ${problems.join('\n  ')}`);
  if (page) {
    try {
      await page.screenshot({ path: shotPath('-failure'), fullPage: true });
      console.error(`failure screenshot: ${shotPath('-failure')}`);
    } catch { /* browser gone */ }
  }
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
