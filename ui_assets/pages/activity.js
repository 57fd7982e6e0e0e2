// Activity page: the recorded requests, newest first, a page at a time
// (/api/metrics/activity), refreshed when an `activity` event says a row was recorded; a
// per-model summary (/api/metrics/stats?model=...: totals and p50/p95 speeds); and a chart of
// the prompt and generation tokens per second of the latest requests over time (uPlot, as on
// the performance page). Rows per page and the time format are the settings page's
// (prefs.js); choosing rows per page here changes that setting.

import uPlot from '/ui/vendor/uPlot.esm.js';
import { getJSON, on, live } from '/ui/api.js';
import { h, replace, field, fmtCount, fmtSpeed, fmtMs, fmtTime, fmtClock, coalesce } from '/ui/dom.js';
import { prefs, CHOICES } from '/ui/prefs.js';
import { chartWidth, sizedToBoxes } from '/ui/charts.js';

const CHART_ROWS = 200;
const CHART_HEIGHT = 200;
const PAGE_SIZES = CHOICES.activityPageSize;

export function mount(root) {
  let alive = true;
  let page = 1;
  let limit = prefs.get().activityPageSize;
  let model = '';  // '' = every model
  let key = '';    // '' = every API key (or none)

  const modelSelect = h('select', { 'data-testid': 'activity-model' });
  const keySelect = h('select', { 'data-testid': 'activity-key' });
  const keyField = field('API key', keySelect);
  keyField.hidden = true;  // until some row carries a key
  const limitSelect = h('select', { 'data-testid': 'activity-limit' }, PAGE_SIZES.map((n) => h('option', { value: n }, n)));
  limitSelect.value = limit;
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
  const chartFigure = h('div', { class: 'chart-box', role: 'figure', 'data-testid': 'speed-chart' });

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
  // The choice is the setting: the next visit (and the settings page) shows it too; the
  // page follows it in onPrefs below.
  limitSelect.addEventListener('change', () => prefs.set({ activityPageSize: Number(limitSelect.value) }));
  prev.addEventListener('click', () => { page -= 1; refreshRows(); });
  next.addEventListener('click', () => { page += 1; refreshRows(); });

  function activityQuery(extra) {
    const params = new URLSearchParams(extra);
    if (model) params.append('model', model);
    if (key) params.append('key', key);
    return `/api/metrics/activity?${params}`;
  }

  // Rows ##################################################################################

  // Only the latest request's answer is shown: one for an earlier page or page size may come
  // back after it.
  let rowsRequest = 0;

  async function refreshRows() {
    const request = ++rowsRequest;
    let body;
    try {
      body = await getJSON(activityQuery({ page, limit }));
    } catch (err) {
      if (request === rowsRequest) showError(err);
      return;
    }
    if (!alive || request !== rowsRequest) return;
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

  // One point per request with a measured speed, oldest first; the chart is built once and
  // given new data after that (built again for a new theme or time format).
  let chartPoints = [];
  let plot = null;

  // Draws the chart and returns the rows it was drawn from.
  async function refreshChart() {
    let rows;
    try {
      rows = (await getJSON(activityQuery({ limit: CHART_ROWS }))).data;
    } catch {
      return [];  // refreshRows reports the same failure
    }
    if (alive) drawChart(speedPoints(rows));
    return rows;
  }

  function drawChart(points) {
    chartPoints = points;
    if (!points.length) {
      destroyChart();
      replace(chartBox, h('p', { class: 'empty', 'data-testid': 'speed-chart-empty' },
        'No speed measurements yet (the upstream reports none).'));
      return;
    }
    const data = [points.map((p) => p.t), points.map((p) => p.gen), points.map((p) => p.prompt)];
    chartFigure.setAttribute('aria-label', `Prompt and generation tokens per second of ${points.length} requests`);
    if (plot) {
      plot.setData(data);
      plot.setLegend();  // the newest request, unless the pointer is on the chart
      return;
    }
    replace(chartBox, chartFigure);
    plot = new uPlot(chartOptions(readTheme()), data, chartFigure);
    sizing.add(chartBox, plot);
  }

  function destroyChart() {
    if (!plot) return;
    sizing.remove(chartBox);
    plot.destroy();
    plot = null;
  }

  function rebuildChart() {
    destroyChart();
    if (chartPoints.length) drawChart(chartPoints);
  }

  function chartOptions(theme) {
    const axis = {
      stroke: theme.muted,
      font: theme.font,
      grid: { stroke: theme.grid, width: 1 },
      ticks: { stroke: theme.grid, width: 1, size: 4 },
    };
    const line = (label, colour) => ({
      label,
      stroke: colour,
      width: 1.5,
      spanGaps: true,  // a request that measured only the other speed leaves no gap
      points: { show: true, size: 5, fill: colour },
      value: (u, v, sidx, idx) => {
        const shown = atRest(idx) ? u.data[sidx].at(-1) : v;
        return shown === null || shown === undefined ? '—' : `${fmtSpeed(shown)} t/s`;
      },
    });
    return {
      width: chartWidth(chartBox),
      height: CHART_HEIGHT,
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
      scales: {
        x: { time: true, range: timeRange },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] },
      },
      axes: [
        { ...axis, space: 90, values: (u, splits) => splits.map((t) => fmtClock(t * 1000)) },
        { ...axis, size: 52, values: (u, splits) => splits.map((v) => String(Number(v.toFixed(1)))) },
      ],
      series: [
        // The legend names the request under the pointer (at rest: the newest) by its id,
        // model and time.
        {
          label: 'request',
          value: (u, v, sidx, idx) => {
            const point = chartPoints[atRest(idx) ? chartPoints.length - 1 : idx];
            return point ? `#${point.row.id} ${point.row.model} · ${fmtTime(point.t * 1000)}` : '—';
          },
        },
        line('generation', theme.generation),
        line('prompt', theme.prompt),
      ],
    };
  }

  const sizing = sizedToBoxes(CHART_HEIGHT);

  // The system switching between light and dark (theme "system"): the colours are read again.
  const darkQuery = matchMedia('(prefers-color-scheme: dark)');
  darkQuery.addEventListener('change', rebuildChart);

  // Settings ##############################################################################

  function onPrefs(now, before) {
    if (now.activityPageSize !== limit) {
      limit = now.activityPageSize;
      limitSelect.value = limit;
      page = 1;
      refreshRows();
    }
    if (now.timeFormat !== before.timeFormat) {
      refreshRows();
      rebuildChart();
    } else if (now.theme !== before.theme) {
      rebuildChart();
    }
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
    prefs.onChange(onPrefs),
  ];
  return () => {
    alive = false;
    refreshSoon.cancel();
    offs.forEach((off) => off());
    darkQuery.removeEventListener('change', rebuildChart);
    destroyChart();
    sizing.stop();
  };
}

// Speed chart #############################################################################

// The requests with a measured speed (a value above 0; the server writes 0 or -1 for none),
// oldest first, their times in Unix seconds. Rows' times are whole seconds: requests of one
// second go in the order of their ids.
export function speedPoints(rows) {
  const measured = (value) => (typeof value === 'number' && value > 0 ? value : null);
  return rows
    .map((row) => ({
      t: Date.parse(row.timestamp) / 1000,
      gen: measured(row.tokens?.tokens_per_second),
      prompt: measured(row.tokens?.prompt_per_second),
      row,
    }))
    .filter((p) => !isNaN(p.t) && (p.gen !== null || p.prompt !== null))
    .sort((a, b) => a.t - b.t || a.row.id - b.row.id);
}

// The requests' times, a minute at least (uPlot would make one moment a day, and a few
// seconds would be labelled with the same second over and over), with a little room at the
// ends so the first and last points are not cut in half. From the data, not uPlot's min and
// max, which it has already widened for one moment.
const MIN_SPAN_S = 60;

function timeRange(u) {
  const times = u.data[0];
  const first = times[0];
  const last = times[times.length - 1];
  const pad = Math.max((MIN_SPAN_S - (last - first)) / 2, (last - first) * 0.02);
  return [first - pad, last + pad];
}

// The legend asks for the values at no index while the pointer is off the chart.
function atRest(idx) {
  return idx === null || idx === undefined;
}

function readTheme() {
  const style = getComputedStyle(document.documentElement);
  const css = (name) => style.getPropertyValue(name).trim();
  return {
    muted: css('--muted'),
    grid: css('--border'),
    font: `12px ${getComputedStyle(document.body).fontFamily}`,
    generation: css('--chart-1'),
    prompt: css('--chart-2'),
  };
}

