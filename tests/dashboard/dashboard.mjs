// Drives the apex dashboard in headless Debian Chromium, the way an operator uses it.
//
// Run by tests/tests/dashboard.rs (which starts a real hub and apex-node). Environment:
//   APEX_URL         hub base URL, e.g. http://127.0.0.1:8088 (required)
//   APEX_API_KEY     an API key of that hub (required)
//   APEX_NODE_NAME   name of the node the test starts (required)
//   APEX_SCREENSHOT  where to save the overview screenshot (default target/dashboard.png);
//                    the nodes and task views go next to it (-nodes.png, -task.png, -logs.png)
//   CHROMIUM         browser binary (default /usr/bin/chromium)
//   APEX_WAIT_EMPTY  "1": first see the nodes table empty and print `STEP nodes-empty`, after
//                    which the driver starts the node (so the row must appear live)
//   APEX_EXPECT_NODES  nodes the overview must count online at the end (default 1; the driver
//                    may start more after `STEP node-online`)
//
// Prints `STEP <name>` lines as it goes and `DASHBOARD OK` at the end; exits 1 with the reason
// (and a failure screenshot) on any failed expectation.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = required('APEX_URL').replace(/\/$/, '');
const KEY = required('APEX_API_KEY');
const NODE_NAME = required('APEX_NODE_NAME');
const SHOT = process.env.APEX_SCREENSHOT || 'target/dashboard.png';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT_EMPTY = process.env.APEX_WAIT_EMPTY === '1';
const EXPECT_NODES = Number(process.env.APEX_EXPECT_NODES || '1');
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

/** The hub's API from this script (not the browser), with the key. */
async function api(method, path, body) {
  const resp = await fetch(BASE + path, {
    method,
    headers: { Authorization: `Bearer ${KEY}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await resp.text();
  if (!resp.ok) throw new Error(`${method} ${path}: ${resp.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

function expect(cond, msg) {
  if (!cond) throw new Error(`expectation failed: ${msg}`);
}

const profile = mkdtempSync(join(tmpdir(), 'apex-dashboard-chromium-'));
mkdirSync(dirname(SHOT), { recursive: true });
let context;
let page;
const problems = [];
let traffic = false;

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
  page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);

  // Every data call must carry the key; nothing may leave the hub's origin.
  const origin = new URL(BASE).origin;
  page.on('request', (req) => {
    const url = new URL(req.url());
    if (url.origin !== origin && url.protocol !== 'data:') problems.push(`request to another origin: ${req.url()}`);
    const isData = url.pathname.startsWith('/api/') || url.pathname.startsWith('/v1/');
    if (isData && !String(req.headers().authorization || '').startsWith('Bearer ')) {
      problems.push(`data call without Authorization: ${req.method()} ${url.pathname}`);
    }
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // The wrong-key attempt logs its 401 as a failed resource load; that one is expected.
    if (m.type() === 'error' && !/status of 401/.test(m.text())) problems.push(`console error: ${m.text()}`);
  });

  // ---- sign-in: a wrong key is refused with a clear message ----------------------------------
  const resp = await page.goto(`${BASE}/dashboard`);
  expect(resp.status() === 200, `/dashboard answered ${resp.status()}`);
  await page.locator('#signin-key').waitFor({ state: 'visible' });
  step('signin-shown');
  await page.fill('#signin-key', 'not-the-right-key');
  await page.click('#signin-submit');
  const err = page.locator('#signin-error');
  await err.waitFor({ state: 'visible' });
  const errText = await err.textContent();
  expect(/rejected/i.test(errText) && /401/.test(errText), `wrong-key message: ${errText}`);
  expect(await page.locator('#app').isHidden(), 'the app is shown after a wrong key');
  step('wrong-key-refused');

  await page.fill('#signin-key', KEY);
  await page.click('#signin-submit');
  await page.locator('#app').waitFor({ state: 'visible' });
  const stored = await page.evaluate(() => sessionStorage.getItem('apex.dashboard.apiKey'));
  expect(stored === KEY, 'the key is kept in sessionStorage');
  await page.locator('#live[data-state="live"]').waitFor();
  step('signed-in');

  // ---- a node appears in the nodes table -------------------------------------------------------
  await page.click('.tabs a[data-view="nodes"]');
  const nodesTable = page.locator('#nodes-table');
  await nodesTable.waitFor();
  if (WAIT_EMPTY) {
    await page.locator('#nodes-table tr.empty').waitFor();
    step('nodes-empty');
  }
  const nodeRow = page.locator('#nodes-table tbody tr[data-node-id]', { hasText: NODE_NAME });
  await nodeRow.locator('.badge-online').waitFor();
  const nodeId = await nodeRow.getAttribute('data-node-id');
  expect(nodeId, 'node row has an id');
  expect(/echo/.test(await nodeRow.locator('td.tools').textContent()), 'node row lists its tools');
  step(`node-online ${nodeId}`);

  // ---- tasks submitted through the API complete in the task list and the task view -------------
  const task = await api('POST', '/api/v1/tasks', { tool: 'echo', args: { greeting: 'hello from the dashboard test' }, description: 'dashboard test' });
  const others = await api('POST', '/api/v1/tasks/batch', {
    tasks: [
      ...Array.from({ length: 12 }, (_, i) => ({ tool: 'sha256', args: { text: `payload ${i}` } })),
      { tool: 'sleep', args: { ms: 'not a number' }, description: 'bad arguments on purpose' },
      { tool: 'sleep', args: { ms: 1500 } },
    ],
  });
  expect(others.data.length === 14, 'batch accepted');
  step(`task-submitted ${task.task_id}`);

  // Background traffic, so the overview's charts have something to show: a batch of short
  // tasks every 700 ms, some of which queue behind the node's concurrency limit.
  traffic = true;
  let round = 0;
  const trafficLoop = (async () => {
    while (traffic) {
      round += 1;
      const batch = Array.from({ length: 16 }, (_, i) => (i % 4 === 0
        ? { tool: 'sleep', args: { ms: 150 + (i * 37) % 400 } }
        : { tool: 'sha256', args: { text: `round ${round} item ${i}` } }));
      if (round % 9 === 0) batch.push({ tool: 'sleep', args: { ms: -1 }, description: 'bad arguments on purpose' });
      await api('POST', '/api/v1/tasks/batch', { tasks: batch }).catch((e) => problems.push(`background submit: ${e.message}`));
      await new Promise((r) => setTimeout(r, 700));
    }
  })();

  await page.click('.tabs a[data-view="tasks"]');
  await page.locator('#tasks-table tbody tr[data-task-id]').first().waitFor();

  // Under steady traffic the list re-renders live, but at most once per second.
  const renders = await page.evaluate(async () => {
    const body = document.querySelector('#tasks-table tbody');
    let n = 0;
    const mo = new MutationObserver((records) => { n += records.filter((r) => r.type === 'childList').length; });
    mo.observe(body, { childList: true });
    await new Promise((r) => setTimeout(r, 6000));
    mo.disconnect();
    return n;
  });
  expect(renders >= 2 && renders <= 7, `task list rendered ${renders} times in 6 s under traffic (want live, at most 1/s)`);
  await page.screenshot({ path: shotPath('-tasks') });
  step(`task-list-coalesced ${renders}`);

  // Filters are applied by the hub: failed tasks only, then the one echo task.
  await page.selectOption('#main select[name="status"]', 'failed');
  await page.waitForFunction(() => location.hash.includes('status=failed'));
  await page.locator('#tasks-table tbody tr[data-status="failed"]').first().waitFor();
  const statuses = await page.locator('#tasks-table tbody tr[data-task-id]').evaluateAll((rows) => rows.map((r) => r.dataset.status));
  expect(statuses.length >= 1 && statuses.every((s) => s === 'failed'), `status filter shows only failed: ${statuses}`);
  step('task-filter-failed');
  await page.selectOption('#main select[name="status"]', '');
  await page.waitForFunction(() => !location.hash.includes('status='));
  await page.fill('#main input[name="tool"]', 'echo');
  await page.press('#main input[name="tool"]', 'Enter');
  await page.waitForFunction(() => location.hash.includes('tool=echo'));
  const taskRow = page.locator(`#tasks-table tbody tr[data-task-id="${task.task_id}"]`);
  await page.locator(`#tasks-table tbody tr[data-task-id="${task.task_id}"][data-status="succeeded"]`).waitFor();
  const tools = await page.locator('#tasks-table tbody tr[data-task-id] td:nth-child(2)').allTextContents();
  expect(tools.every((t) => t === 'echo'), `tool filter shows only echo: ${tools}`);
  step('task-succeeded-in-list');

  await taskRow.click();
  await page.waitForFunction((id) => location.hash === `#/tasks/${id}`, task.task_id);
  await page.locator('#task-status .badge-succeeded').waitFor();
  await page.locator('#events-table tr[data-event="task_completed"]').waitFor();
  const kinds = await page.locator('#events-table tr[data-event]').evaluateAll((rows) => rows.map((r) => r.dataset.event));
  expect(kinds[0] === 'task_created' && kinds.includes('task_assigned'), `task events: ${kinds}`);
  expect(/hello from the dashboard test/.test(await page.locator('pre.json').last().textContent()), 'result shown');
  await page.screenshot({ path: shotPath('-task') });
  step('task-view');

  // ---- drain and undrain a node from the table ---------------------------------------------------
  await page.click('.tabs a[data-view="nodes"]');
  const row = () => page.locator(`#nodes-table tbody tr[data-node-id="${nodeId}"]`);
  await row().locator('button[data-action="drain"]').click();
  await page.locator(`#nodes-table tbody tr[data-node-id="${nodeId}"][data-status="draining"]`).waitFor();
  const drained = await api('GET', `/v1/nodes/${encodeURIComponent(nodeId)}`);
  expect(drained.status === 'draining', `hub says ${drained.status} after drain`);
  step('node-drained');
  await page.screenshot({ path: shotPath('-nodes') });
  await row().locator('button[data-action="undrain"]').click();
  await page.locator(`#nodes-table tbody tr[data-node-id="${nodeId}"][data-status="online"]`).waitFor();
  step('node-undrained');

  // ---- live log tail --------------------------------------------------------------------------
  await page.click('.tabs a[data-view="logs"]');
  await page.locator('#logtail .log-line').first().waitFor();
  const marker = await api('POST', '/api/v1/tasks', { tool: 'echo', args: { marker: 'log-tail-marker' } });
  await page.locator('#logtail .log-line', { hasText: 'log-tail-marker' }).waitFor();
  await page.screenshot({ path: shotPath('-logs') });
  step(`log-tail ${marker.task_id}`);

  // ---- overview: counts, charts with data, recent failures -------------------------------------
  await page.click('.tabs a[data-view="overview"]');
  await page.locator('.kpi[data-kpi="nodes"] .kpi-value', { hasText: new RegExp(`^${EXPECT_NODES}$`) }).waitFor();
  await page.locator('#failures tbody tr.clickable').first().waitFor();
  // a few more status samples (2 s apart) so the charts have lines
  await page.waitForTimeout(8000);
  await page.screenshot({ path: SHOT, fullPage: true });
  step('overview');
  traffic = false;
  await trafficLoop;

  // ---- reload keeps the session; sign-out forgets the key ------------------------------------
  await page.reload();
  await page.locator('#app').waitFor({ state: 'visible' });
  await page.click('#signout');
  await page.locator('#signin-key').waitFor({ state: 'visible' });
  expect((await page.evaluate(() => sessionStorage.getItem('apex.dashboard.apiKey'))) === null, 'sign-out clears the key');
  step('signed-out');

  // A key saved in this tab that the hub no longer accepts sends the operator back to sign-in.
  await page.evaluate(() => sessionStorage.setItem('apex.dashboard.apiKey', 'a-revoked-key'));
  await page.reload();
  await page.locator('#signin-error').waitFor({ state: 'visible' });
  const stale = await page.locator('#signin-error').textContent();
  expect(/saved key no longer works/i.test(stale) && /401/.test(stale), `stale-key message: ${stale}`);
  expect(await page.locator('#app').isHidden(), 'the app is shown with a revoked key');
  step('stale-key-refused');

  expect(problems.length === 0, `problems seen:\n  ${problems.join('\n  ')}`);
  console.log(`DASHBOARD OK screenshot=${SHOT}`);
} catch (e) {
  console.error(`DASHBOARD FAILED: ${e.message}`);
  if (problems.length) console.error(`also seen:\n  ${problems.join('\n  ')}`);
  if (page) {
    try {
      await page.screenshot({ path: shotPath('-failure'), fullPage: true });
      console.error(`failure screenshot: ${shotPath('-failure')}`);
    } catch { /* browser gone */ }
  }
  process.exitCode = 1;
} finally {
  traffic = false;
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
