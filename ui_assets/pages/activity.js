// Activity page: the recorded requests, newest first, a page at a time
// (/api/metrics/activity), refreshed when an `activity` event says a row was recorded; a
// per-model summary (/api/metrics/stats?model=...: totals and p50/p95 speeds); and a chart of
// tokens per second over time drawn as inline SVG from the latest rows.

import { getJSON, on, live } from '/ui/api.js';
import { h, replace, field, fmtCount, fmtSpeed, fmtMs, fmtTime, coalesce } from '/ui/dom.js';

const CHART_ROWS = 200;
const PAGE_SIZES = [25, 50, 100];

export function mount(root) {
  let alive = true;
  let page = 1;
  let limit = PAGE_SIZES[0];
  let model = '';  // '' = every model
  let key = '';    // '' = every API key (or none)

  const modelSelect = h('select', { 'data-testid': 'activity-model' });
  const keySelect = h('select', { 'data-testid': 'activity-key' });
  const keyField = field('API key', keySelect);
  keyField.hidden = true;  // until some row carries a key
  const limitSelect = h('select', {}, PAGE_SIZES.map((n) => h('option', { value: n }, n)));
  const tableBody = h('tbody');
  const table = h('table', { 'data-testid': 'activity-table' },
    h('thead', {}, h('tr', {},
      h('th', { class: 'num' }, 'ID'), h('th', {}, 'Time'), h('th', {}, 'Model'), h('th', {}, 'Key'), h('th', {}, 'Path'),
      h('th', { class: 'num' }, 'Status'), h('th', { class: 'num' }, 'In'), h('th', { class: 'num' }, 'Out'),
      h('th', { class: 'num' }, 'Cached'), h('th', { class: 'num' }, 'Prompt t/s'), h('th', { class: 'num' }, 'Gen t/s'),
      h('th', { class: 'num' }, 'Duration'), h('th', {}, 'Capture'))),
    tableBody);
  const empty = h('p', { class: 'empty', hidden: true }, 'No requests recorded yet.');
  const prev = h('button', { type: 'button', 'data-testid': 'activity-prev' }, '← Newer');
  const next = h('button', { type: 'button', 'data-testid': 'activity-next' }, 'Older →');
  const pageInfo = h('span', { class: 'muted', 'data-testid': 'activity-page' });
  const error = h('p', { class: 'error-text', hidden: true });
  const summaryBody = h('tbody');
  const chartBox = h('div');

  root.append(
    h('h1', {}, 'Activity'),
    h('div', { class: 'toolbar' }, field('Model', modelSelect), keyField, field('Rows per page', limitSelect)),
    error,
    h('div', { class: 'grid-2' },
      h('section', { class: 'panel' },
        h('h2', { style: 'margin-top:0' }, 'Per model'),
        h('div', { class: 'table-wrap' }, h('table', { 'data-testid': 'activity-summary' },
          h('thead', {}, h('tr', {},
            h('th', {}, 'Model'), h('th', { class: 'num' }, 'Requests'), h('th', { class: 'num' }, 'Tokens in'),
            h('th', { class: 'num' }, 'Tokens out'), h('th', { class: 'num' }, 'Cached'),
            h('th', { class: 'num' }, 'Prompt t/s', h('br'), 'p50 / p95'), h('th', { class: 'num' }, 'Gen t/s', h('br'), 'p50 / p95'))),
          summaryBody))),
      h('section', { class: 'panel' },
        h('h2', { style: 'margin-top:0' }, `Tokens per second (last ${CHART_ROWS} requests)`),
        chartBox)),
    h('h2', {}, 'Requests'),
    h('div', { class: 'table-wrap' }, table),
    empty,
    h('div', { class: 'pager' }, prev, pageInfo, next));

  // Model filter ##########################################################################

  function renderModelOptions() {
    const ids = (live.models || []).map((m) => m.id);
    if (model && !ids.includes(model)) ids.push(model);
    replace(modelSelect, h('option', { value: '' }, 'all models'), ids.map((id) => h('option', { value: id }, id)));
    modelSelect.value = model;
  }

  // The keys' names, from the totals per key; shown only once a row has one.
  async function refreshKeyOptions() {
    let groups;
    try {
      groups = (await getJSON('/api/metrics/activity?group=key')).groups || [];
    } catch {
      return;
    }
    if (!alive) return;
    const names = groups.map((g) => g.key).filter(Boolean);
    if (key && !names.includes(key)) names.push(key);
    keyField.hidden = names.length === 0;
    replace(keySelect, h('option', { value: '' }, 'all keys'), names.sort().map((name) => h('option', { value: name }, name)));
    keySelect.value = key;
  }

  keySelect.addEventListener('change', () => {
    key = keySelect.value;
    page = 1;
    refreshRows();
  });
  modelSelect.addEventListener('change', () => {
    model = modelSelect.value;
    page = 1;
    refreshAll();
  });
  limitSelect.addEventListener('change', () => {
    limit = Number(limitSelect.value);
    page = 1;
    refreshRows();
  });
  prev.addEventListener('click', () => { page -= 1; refreshRows(); });
  next.addEventListener('click', () => { page += 1; refreshRows(); });

  function activityQuery(extra) {
    const params = new URLSearchParams(extra);
    if (model) params.append('model', model);
    if (key) params.append('key', key);
    return `/api/metrics/activity?${params}`;
  }

  // Rows ##################################################################################

  async function refreshRows() {
    let body;
    try {
      body = await getJSON(activityQuery({ page, limit }));
    } catch (err) {
      showError(err);
      return;
    }
    if (!alive) return;
    error.hidden = true;
    // Rows may have gone (in-memory store pruned): step back to the last page there is.
    if (body.total_pages > 0 && page > body.total_pages) {
      page = body.total_pages;
      refreshRows();
      return;
    }
    tableBody.replaceChildren(...body.data.map(rowElement));
    empty.hidden = body.data.length > 0;
    prev.disabled = page <= 1;
    next.disabled = page >= body.total_pages;
    pageInfo.textContent = body.total
      ? `page ${body.page} of ${body.total_pages} · ${body.total.toLocaleString()} requests`
      : '';
  }

  function rowElement(row) {
    const t = row.tokens || {};
    const failed = row.resp_status_code >= 400;
    const capture = row.has_capture
      ? h('a', { href: `/ui/captures/${row.id}`, 'data-testid': `capture-link-${row.id}` }, 'open')
      : h('span', { class: 'muted' }, '—');
    return h('tr', { 'data-testid': `activity-row-${row.id}`, title: row.error_msg || null },
      h('td', { class: 'num' }, row.id),
      h('td', { style: 'white-space:nowrap' }, fmtTime(row.timestamp)),
      h('td', {}, h('span', { class: 'model-id' }, row.model)),
      h('td', {}, row.key ? h('span', { class: 'tag' }, row.key) : h('span', { class: 'muted' }, '—')),
      h('td', {}, h('span', { class: 'mono' }, row.req_path)),
      h('td', { class: failed ? 'num status-error' : 'num' }, row.resp_status_code,
        row.error_msg ? h('div', { class: 'muted', style: 'font-weight:normal;white-space:normal;max-width:20em' }, row.error_msg) : null),
      h('td', { class: 'num' }, fmtCount(t.input_tokens)),
      h('td', { class: 'num' }, fmtCount(t.output_tokens)),
      h('td', { class: 'num' }, fmtCount(t.cache_tokens)),
      h('td', { class: 'num' }, fmtSpeed(t.prompt_per_second)),
      h('td', { class: 'num' }, fmtSpeed(t.tokens_per_second)),
      h('td', { class: 'num' }, fmtMs(row.duration_ms)),
      h('td', {}, capture));
  }

  function showError(err) {
    error.textContent = `Could not load the activity: ${err.message}`;
    error.hidden = false;
  }

  // Summary ###############################################################################

  // One stats request per model (the endpoint filters by one model): the local models and
  // whatever else answered among the recent rows (peers can list hundreds of models, most
  // never used). Models without requests are left out; without a model filter an
  // "all models" line comes first.
  async function refreshSummary(recentRows) {
    const local = (live.models || []).filter((m) => !m.peerID).map((m) => m.id);
    const ids = [...new Set([...local, ...recentRows.map((row) => row.model)])].sort();
    const targets = model ? [{ id: model, label: model }]
      : [{ id: '', label: 'all models' }, ...ids.map((id) => ({ id, label: id }))];
    let results;
    try {
      results = await Promise.all(targets.map((target) =>
        getJSON(target.id ? `/api/metrics/stats?model=${encodeURIComponent(target.id)}` : '/api/metrics/stats')));
    } catch (err) {
      showError(err);
      return;
    }
    if (!alive) return;
    const lines = targets.map((target, i) => [target, results[i]]).filter(([, stats]) => stats.total_requests > 0);
    summaryBody.replaceChildren(...(lines.length ? lines.map(([target, stats]) =>
      h('tr', { 'data-testid': `summary-row-${target.id || 'all'}` },
        h('td', { style: 'white-space:nowrap' }, h('span', { class: target.id ? 'model-id' : 'muted' }, target.label)),
        h('td', { class: 'num' }, fmtCount(stats.total_requests)),
        h('td', { class: 'num' }, fmtCount(stats.total_input_tokens)),
        h('td', { class: 'num' }, fmtCount(stats.total_output_tokens)),
        h('td', { class: 'num' }, fmtCount(stats.total_cache_tokens)),
        h('td', { class: 'num' }, percentiles(stats.prompt_histogram)),
        h('td', { class: 'num' }, percentiles(stats.gen_histogram))))
      : [h('tr', {}, h('td', { colspan: 7, class: 'muted' }, 'No requests recorded yet.'))]));
  }

  function percentiles(histogram) {
    return histogram ? `${fmtSpeed(histogram.p50)} / ${fmtSpeed(histogram.p95)}` : '—';
  }

  // Chart #################################################################################

  // Draws the chart and returns the rows it was drawn from.
  async function refreshChart() {
    let rows;
    try {
      rows = (await getJSON(activityQuery({ limit: CHART_ROWS }))).data;
    } catch {
      return [];  // refreshRows reports the same failure
    }
    if (alive) chartBox.replaceChildren(speedChart(rows));
    return rows;
  }

  async function refreshAll() {
    renderModelOptions();
    refreshKeyOptions();
    refreshRows();
    const recentRows = await refreshChart();
    if (alive) refreshSummary(recentRows);
  }
  refreshAll();
  const refreshSoon = coalesce(refreshAll, 500);

  const offs = [
    on('activity', refreshSoon),
    on('reconnected', refreshAll),
    on('modelStatus', renderModelOptions),
  ];
  return () => {
    alive = false;
    refreshSoon.cancel();
    offs.forEach((off) => off());
  };
}

// Speed chart #############################################################################

const SVG = 'http://www.w3.org/2000/svg';
const W = 480;
const H = 200;
const PAD = { left: 44, right: 12, top: 12, bottom: 28 };

function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  element.append(...children);
  return element;
}

// Generation and prompt speed of each request (when measured) against its time.
function speedChart(rows) {
  const points = (key) => rows
    .filter((row) => row.tokens?.[key] > 0)
    .map((row) => ({ t: Date.parse(row.timestamp), v: row.tokens[key], row }))
    .sort((a, b) => a.t - b.t);
  const series = [
    { name: 'generation', className: 'gen', colour: '--accent', points: points('tokens_per_second') },
    { name: 'prompt', className: 'prompt', colour: '--ok', points: points('prompt_per_second') },
  ];
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    return h('p', { class: 'empty', 'data-testid': 'speed-chart-empty' }, 'No speed measurements yet (the upstream reports none).');
  }
  let t0 = Math.min(...all.map((p) => p.t));
  let t1 = Math.max(...all.map((p) => p.t));
  if (t0 === t1) { t0 -= 30000; t1 += 30000; }  // one moment: centre it
  const vMax = niceCeiling(Math.max(...all.map((p) => p.v)));
  const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / vMax) * (H - PAD.top - PAD.bottom);

  const chart = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'data-testid': 'speed-chart',
    'aria-label': `Tokens per second of ${all.length} measurements` });
  // Axes with three horizontal guides and the first/last time.
  for (const fraction of [0, 0.5, 1]) {
    const v = vMax * fraction;
    chart.append(
      svg('line', { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: 'axis' }),
      svg('text', { x: PAD.left - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'label' }, formatValue(v)));
  }
  const timeLabel = (t) => new Date(t).toLocaleTimeString();
  chart.append(
    svg('text', { x: PAD.left, y: H - 8, class: 'label' }, timeLabel(t0)),
    svg('text', { x: W - PAD.right, y: H - 8, 'text-anchor': 'end', class: 'label' }, timeLabel(t1)));
  for (const s of series) {
    if (!s.points.length) continue;
    chart.append(svg('polyline', { class: s.className, points: s.points.map((p) => `${x(p.t)},${y(p.v)}`).join(' ') }));
    for (const p of s.points) {
      chart.append(svg('circle', { cx: x(p.t), cy: y(p.v), r: 2.5, class: s.className },
        svg('title', {}, `#${p.row.id} ${p.row.model}: ${p.v.toFixed(1)} t/s ${s.name}`)));
    }
  }
  const legend = h('div', { class: 'legend' }, series.filter((s) => s.points.length).map((s) =>
    h('span', {}, h('span', { class: 'swatch', style: `background:var(${s.colour})` }), s.name)));
  return h('div', {}, chart, legend);
}

// 1, 2 or 5 times a power of ten, at least `value`: round numbers on the axis.
function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * power).find((n) => n >= value);
}

function formatValue(value) {
  return value.toFixed(value >= 10 ? 0 : 1);
}
