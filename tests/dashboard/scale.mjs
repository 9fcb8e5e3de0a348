// Times the dashboard's views in headless Debian Chromium against a big cluster (run by the
// ignored test `dashboard_at_scale` in tests/tests/dashboard.rs, which fills the hub with
// thousands of nodes and up to a million tasks first). Prints `MEASURE <view> <ms> ms <what>`
// per view: from the route change to the view showing the hub's answer. Fails (exit 1) if a
// view does not show its data within 60 s.
//
// Environment: APEX_URL, APEX_API_KEY, CHROMIUM (default /usr/bin/chromium), APEX_TASK_ID (a
// task whose view to open), APEX_NODE_PAGE / APEX_TASK_PAGE (a deep page of 100 to open;
// default 100 and 5000), APEX_SCREENSHOT (default target/dashboard-scale.png).

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.APEX_URL.replace(/\/$/, '');
const KEY = process.env.APEX_API_KEY;
const TASK_ID = process.env.APEX_TASK_ID || '';
const NODE_PAGE = process.env.APEX_NODE_PAGE || '100';
const TASK_PAGE = process.env.APEX_TASK_PAGE || '5000';
const fmt = (n) => Number(n).toLocaleString('en-US');
const SHOT = process.env.APEX_SCREENSHOT || 'target/dashboard-scale.png';
const profile = mkdtempSync(join(tmpdir(), 'apex-dashboard-scale-'));
let context;
let failed = false;

try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
    viewport: { width: 1440, height: 900 },
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(60_000);
  page.on('pageerror', (e) => { console.error(`page error: ${e.message}`); failed = true; });

  await page.goto(`${BASE}/dashboard`);
  await page.fill('#signin-key', KEY);
  const t0 = Date.now();
  await page.click('#signin-submit');
  await page.locator('.kpi[data-kpi="nodes"] .kpi-value').filter({ hasText: /\d/ }).waitFor();
  console.log(`MEASURE overview ${Date.now() - t0} ms sign-in to counts shown`);

  /**
   * Goes to `hash` with the old view cleared and waits until `sel` matches at least `n`
   * elements (and the pager reads `Page <page> ` when given); prints the time. (The page's CSP
   * forbids eval, so the condition is data for one fixed function.)
   */
  async function measure(name, hash, { sel, n = 1, page: pageNo = null }, what) {
    const start = Date.now();
    await page.evaluate((h) => { document.getElementById('main').replaceChildren(); location.hash = h; }, hash);
    try {
      await page.waitForFunction(({ sel: s, n: k, pageNo: p }) => document.querySelectorAll(s).length >= k
        && (!p || (document.querySelector('.pager-page')?.textContent || '').startsWith(`Page ${p} `)), { sel, n, pageNo }, { polling: 10 });
    } catch (e) {
      console.log(`MEASURE ${name} >${Date.now() - start} ms ${what}: NOT SHOWN (${e.message.split('\n')[0]})`);
      failed = true;
      return null;
    }
    const ms = Date.now() - start;
    const summary = await page.evaluate(() => document.querySelector('.page-head .muted')?.textContent || '');
    console.log(`MEASURE ${name} ${ms} ms ${what} (${summary.trim()})`);
    return ms;
  }
  const NODE_ROWS = '#nodes-table tbody tr[data-node-id]';
  const TASK_ROWS = '#tasks-table tbody tr[data-task-id]';

  await measure('nodes-page-1', '#/nodes', { sel: NODE_ROWS, n: 50 }, 'first 50 nodes');
  await page.screenshot({ path: SHOT.replace(/\.png$/, '-nodes.png') });
  await measure('nodes-draining', '#/nodes?status=draining', { sel: NODE_ROWS }, 'status=draining');
  await measure('nodes-tool', '#/nodes?tool=tool-42', { sel: NODE_ROWS }, 'tool=tool-42');
  await measure(`nodes-page-${NODE_PAGE}`, `#/nodes?page=${NODE_PAGE}&limit=100`, { sel: NODE_ROWS, page: fmt(NODE_PAGE) }, `page ${NODE_PAGE}, 100 per page`);
  await measure('tasks-page-1', '#/tasks', { sel: TASK_ROWS, n: 50 }, 'newest 50 tasks');
  await page.screenshot({ path: SHOT.replace(/\.png$/, '-tasks.png') });
  await measure('tasks-succeeded', '#/tasks?status=succeeded', { sel: TASK_ROWS }, 'status=succeeded');
  await measure('tasks-queued', '#/tasks?status=queued', { sel: TASK_ROWS }, 'status=queued');
  await measure('tasks-tool', '#/tasks?tool=tool-7', { sel: TASK_ROWS }, 'tool=tool-7');
  await measure(`tasks-page-${TASK_PAGE}`, `#/tasks?page=${TASK_PAGE}&limit=100`, { sel: TASK_ROWS, page: fmt(TASK_PAGE) }, `page ${fmt(TASK_PAGE)}, 100 per page`);
  if (TASK_ID) {
    await measure('task-view', `#/tasks/${TASK_ID}`, { sel: '#events-table tr[data-event]' }, 'one task with its events');
  }
  // The overview under whatever load is left, then what the live indicator says.
  await measure('overview-again', '#/overview', { sel: '.kpi[data-kpi="nodes"]' }, 'counts shown');
  await page.waitForTimeout(5000);
  await page.screenshot({ path: SHOT, fullPage: true });
  console.log(`LIVE ${await page.locator('#live-text').textContent()}`);
  // Main-thread time spent in long tasks (over 50 ms) during 10 s on the live task list.
  await page.evaluate(() => { location.hash = '#/tasks'; });
  const longMs = await page.evaluate(async () => {
    let total = 0;
    const po = new PerformanceObserver((l) => { for (const e of l.getEntries()) total += e.duration; });
    po.observe({ type: 'longtask' });
    await new Promise((r) => setTimeout(r, 10_000));
    po.disconnect();
    return Math.round(total);
  });
  console.log(`MEASURE tasks-live-long-tasks ${longMs} ms of main-thread long tasks in 10 s on the live task list`);
} catch (e) {
  console.error(`SCALE FAILED: ${e.message}`);
  failed = true;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
console.log(failed ? 'SCALE FAILED' : 'SCALE OK');
process.exitCode = failed ? 1 : 0;
