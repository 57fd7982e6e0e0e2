// Performance page: the host's CPU, memory, load and network, and each GPU's utilisation,
// memory, temperature and power, as time-series charts of GET /api/performance (uPlot,
// vendored in /ui/vendor/: canvas charts that redraw a few hundred points in well under a
// millisecond).
//
// The first request takes everything the server keeps (its last hour); after that, every
// POLL_MS, only the samples newer than the newest one seen (?after=). Samples older than the
// chosen window are dropped, so a page left open for days holds one window of samples and
// redraws eight small canvases when a sample comes. A hidden tab does not poll; it catches up
// (with ?after=) when it is shown again.

import uPlot from '/ui/vendor/uPlot.esm.js';
import { getJSON, on } from '/ui/api.js';
import { h, field, fmtSeconds, fmtTime, fmtClock } from '/ui/dom.js';
import { chartWidth, sizedToBoxes } from '/ui/charts.js';

// The server samples every 5 s at the most often (performance.every): polling faster would
// only fetch nothing.
const POLL_MS = 5000;
const CHART_HEIGHT = 180;
// The server keeps one hour of samples (HISTORY_SECONDS in llama_swap.py).
const SERVER_HISTORY_S = 3600;
const WINDOWS = [
  { value: '5m', label: '5 min', seconds: 300 },
  { value: '15m', label: '15 min', seconds: 900 },
  { value: '1h', label: '1 h', seconds: 3600 },
  { value: 'all', label: 'all kept', seconds: SERVER_HISTORY_S },
];
const SYNC_KEY = 'performance';  // one cursor across the charts: the same moment everywhere
const PALETTE = ['--chart-1', '--chart-2', '--chart-3', '--chart-4', '--chart-5', '--chart-6', '--chart-7', '--chart-8'];
const MIB_PER_GIB = 1024;

export function mount(root, { query }) {
  let alive = true;
  let windowChoice = WINDOWS.find((w) => w.value === query.get('window')) || WINDOWS[0];

  // Samples in the window, oldest first. A system point per sample; a GPU tick per sampling
  // instant (every GPU is read at the same instant, so a tick holds one reading of each).
  let sysPoints = [];
  let gpuTicks = [];
  let gpuNames = new Map();   // GPU id -> name, as last reported
  let newest = null;          // {t, text}: the newest timestamp seen, for ?after=
  let previousNet = null;     // interface -> [received, sent] bytes at the newest system point

  let timer = null;           // the next poll
  let inFlight = null;        // AbortController of the request under way
  let fullNext = true;        // the next poll asks for everything the server keeps

  const windowSelect = h('select', { 'data-testid': 'perf-window' },
    WINDOWS.map((w) => h('option', { value: w.value }, w.label)));
  windowSelect.value = windowChoice.value;
  const summary = h('p', { class: 'muted', 'data-testid': 'perf-summary', role: 'status' }, 'Loading samples…');
  const error = h('p', { class: 'error-text', hidden: true, 'data-testid': 'perf-error' });
  const systemGrid = h('div', { class: 'chart-grid' });
  const gpuGrid = h('div', { class: 'chart-grid' });
  const gpuNote = h('p', { class: 'empty', 'data-testid': 'perf-gpu-note', hidden: true });
  const gpuList = h('p', { class: 'muted', hidden: true, 'data-testid': 'perf-gpu-list' });
  const systemSection = h('section', { 'aria-label': 'System', hidden: true }, h('h2', {}, 'System'), systemGrid);
  const gpuSection = h('section', { 'aria-label': 'GPUs', hidden: true }, h('h2', {}, 'GPUs'), gpuList, gpuNote, gpuGrid);

  const toolbar = h('div', { class: 'toolbar perf-toolbar' }, field('Window', windowSelect));
  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Performance'), toolbar),
    summary,
    error,
    systemSection,
    gpuSection);

  // Charts ################################################################################

  // Each chart: what it plots (from the points of its source), built again on every draw
  // (cheap); the uPlot is built again only when its series change (a GPU or swap appears).
  const charts = [
    chartPanel('cpu', systemGrid, 'sys', cpuSpec),
    chartPanel('memory', systemGrid, 'sys', memorySpec),
    chartPanel('load', systemGrid, 'sys', loadSpec),
    chartPanel('network', systemGrid, 'sys', networkSpec),
    chartPanel('gpu-util', gpuGrid, 'gpu', gpuSpec('GPU utilisation', (s) => s.util, percentFormat, () => [0, 100])),
    chartPanel('gpu-memory', gpuGrid, 'gpu', gpuSpec('GPU memory used', (s) => s.memUsed, gibFormat, gpuMemoryRange)),
    chartPanel('gpu-temperature', gpuGrid, 'gpu', gpuSpec('GPU temperature', (s) => s.temp, unitFormat('°C'), fromZero)),
    chartPanel('gpu-power', gpuGrid, 'gpu', gpuSpec('GPU power', (s) => s.power, unitFormat('W'), fromZero)),
  ];

  function chartPanel(key, grid, source, makeSpec) {
    const title = h('h3', {});
    const note = h('span', { class: 'muted' });
    const box = h('div', { class: 'chart-box' });
    const panel = h('section', { class: 'panel chart-panel', 'data-testid': `perf-chart-${key}` },
      h('div', { class: 'chart-head' }, title, note), box);
    grid.append(panel);
    return { key, source, makeSpec, title, note, box, plot: null, signature: '' };
  }

  function cpuSpec() {
    const cores = sysPoints.at(-1)?.cores || 0;
    return {
      title: 'CPU',
      note: `average over ${cores} core${cores === 1 ? '' : 's'}`,
      series: [{ label: 'busy', value: (p) => p.cpu }],
      format: percentFormat,
      range: () => [0, 100],
    };
  }

  function memorySpec() {
    const last = sysPoints.at(-1);
    const series = [{ label: 'used', value: (p) => p.memUsed }];
    // Swap gets a line only where there is swap.
    if (last?.swapTotal > 0) series.push({ label: 'swap used', value: (p) => p.swapUsed });
    const swap = last?.swapTotal > 0 ? ` (swap ${gibFormat.value(last.swapTotal)})` : '';
    return {
      title: 'Memory used',
      note: last ? `of ${gibFormat.value(last.memTotal)}${swap}` : '',
      series,
      format: gibFormat,
      range: () => [0, Math.max(last?.memTotal || 0, last?.swapTotal || 0) || 1],
    };
  }

  function loadSpec() {
    return {
      title: 'Load average',
      note: `${sysPoints.at(-1)?.cores || 0} cores`,
      series: [
        { label: '1 min', value: (p) => p.load1 },
        { label: '5 min', value: (p) => p.load5 },
        { label: '15 min', value: (p) => p.load15 },
      ],
      format: loadFormat,
      range: fromZero,
    };
  }

  function networkSpec() {
    return {
      title: 'Network',
      note: 'every interface but loopback',
      series: [{ label: 'received', value: (p) => p.rx }, { label: 'sent', value: (p) => p.tx }],
      format: rateFormat,
      range: fromZero,
    };
  }

  // One chart of a GPU reading, a line per GPU.
  function gpuSpec(title, read, format, range) {
    return () => ({
      title,
      note: '',
      series: [...gpuNames.keys()].sort((a, b) => a - b).map((id) => ({
        label: `GPU ${id}`,
        value: (tick) => {
          const stat = tick.stats.get(id);
          return stat ? read(stat) : null;
        },
      })),
      format,
      range,
    });
  }

  function gpuMemoryRange() {
    const totals = gpuTicks.at(-1) ? [...gpuTicks.at(-1).stats.values()].map((s) => s.memTotal) : [];
    return [0, Math.max(0, ...totals) || 1];
  }

  function draw() {
    let theme = null;  // read once a chart is built
    for (const chart of charts) {
      const points = chart.source === 'sys' ? sysPoints : gpuTicks;
      const panelShown = chart.source === 'sys' ? sysPoints.length > 0 : gpuTicks.length > 0;
      if (!panelShown) {
        destroyPlot(chart);
        continue;
      }
      const spec = chart.makeSpec();
      chart.title.textContent = spec.title;
      chart.note.textContent = spec.note;
      const data = [points.map((p) => p.t), ...spec.series.map((s) => points.map(s.value))];
      const signature = spec.series.map((s) => s.label).join('|');
      if (chart.plot && chart.signature === signature) {
        chart.spec = spec;  // the range and format read through chart.spec
        chart.plot.setData(data);
        chart.plot.setLegend();  // values of the newest point, unless the pointer is on the chart
      } else {
        destroyPlot(chart);
        chart.spec = spec;
        chart.signature = signature;
        theme ??= readTheme();
        chart.plot = new uPlot(plotOptions(chart, theme), data, chart.box);
        sizing.add(chart.box, chart.plot);
      }
    }
  }

  function destroyPlot(chart) {
    if (!chart.plot) return;
    sizing.remove(chart.box);
    chart.plot.destroy();
    chart.plot = null;
    chart.signature = '';
  }

  // Options read the chart's current spec through `chart`, so a new range (more memory, a
  // hotter GPU) needs no rebuild.
  function plotOptions(chart, theme) {
    const axis = {
      stroke: theme.muted,
      font: theme.font,
      grid: { stroke: theme.grid, width: 1 },
      ticks: { stroke: theme.grid, width: 1, size: 4 },
    };
    return {
      width: chartWidth(chart.box),
      height: CHART_HEIGHT,
      cursor: { drag: { x: false, y: false }, sync: { key: SYNC_KEY } },
      legend: { live: true },
      scales: {
        x: { time: true, range: timeRange },
        y: { range: (u, min, max) => chart.spec.range(min, max) },
      },
      axes: [
        // Room for "12:05pm" under every tick (uPlot's default spacing labels each 30 s,
        // and its two-line labels then run into each other).
        { ...axis, space: 80 },
        { ...axis, size: axisSize, values: (u, splits) => splits.map((v) => chart.spec.format.axis(v)) },
      ],
      series: [
        // At rest (no pointer on the chart) the legend shows the newest sample.
        { value: (u, v, sidx, idx) => clock(atRest(idx) ? u.data[0].at(-1) : v) },
        ...chart.spec.series.map((s, i) => ({
          label: s.label,
          stroke: theme.colours[i % theme.colours.length],
          width: 1.5,
          // Lines only, but a first sample or two would draw nothing: those get dots.
          points: { show: (u) => u.data[0].length < 3, fill: theme.colours[i % theme.colours.length] },
          value: (u, v, sidx, idx) => {
            const shown = atRest(idx) ? u.data[sidx].at(-1) : v;
            return shown === null || shown === undefined ? '—' : chart.spec.format.value(shown);
          },
        })),
      ],
    };
  }

  // The x axis spans the chosen window up to the newest sample, however few samples there
  // are yet (a chart of the last 5 minutes reads as one); "all kept" spans what there is, a
  // minute at least (a span of seconds would be labelled in milliseconds).
  function timeRange(u, min, max) {
    const end = newest ? newest.t : max;
    if (windowChoice.value === 'all') return [Math.min(min, end - 60), end];
    return [end - windowChoice.seconds, end];
  }

  const sizing = sizedToBoxes(CHART_HEIGHT);  // each chart's box is sized by the grid

  // Colours are the theme's: read again when the system switches between light and dark,
  // and the charts built again with them.
  const darkQuery = matchMedia('(prefers-color-scheme: dark)');
  function rebuildForTheme() {
    for (const chart of charts) destroyPlot(chart);
    draw();
  }
  darkQuery.addEventListener('change', rebuildForTheme);

  // Samples ###############################################################################

  // Whether anything new came (a poll between two samples brings nothing to draw).
  function ingest(body) {
    const before = newest;
    for (const raw of body.sys_stats || []) addSystem(raw);
    for (const raw of body.gpu_stats || []) addGpu(raw);
    trim();
    return newest !== before;
  }

  function addSystem(raw) {
    const t = seconds(raw.timestamp);
    const last = sysPoints.at(-1);
    if (t === null || (last && t <= last.t)) return;  // seen already
    const cores = raw.cpu_util_per_core || [];
    const net = new Map((raw.net_io || []).map((n) => [n.name, [n.bytes_recv, n.bytes_sent]]));
    const rates = last && previousNet ? netRates(previousNet, net, t - last.t) : { rx: null, tx: null };
    previousNet = net;
    sysPoints.push({
      t,
      cores: cores.length,
      cpu: cores.length ? cores.reduce((a, b) => a + b, 0) / cores.length : null,
      // In GiB, not bytes: the axis then splits at round numbers of GiB.
      memUsed: raw.mem_used_mb / MIB_PER_GIB,
      memTotal: raw.mem_total_mb / MIB_PER_GIB,
      swapUsed: raw.swap_used_mb / MIB_PER_GIB,
      swapTotal: raw.swap_total_mb / MIB_PER_GIB,
      load1: raw.load_avg_1,
      load5: raw.load_avg_5,
      load15: raw.load_avg_15,
      rx: rates.rx,
      tx: rates.tx,
    });
    noteNewest(t, raw.timestamp);
  }

  function addGpu(raw) {
    const t = seconds(raw.timestamp);
    if (t === null) return;
    let tick = gpuTicks.at(-1);
    if (tick && t < tick.t) return;  // seen already
    if (!tick || t > tick.t) {
      tick = { t, stats: new Map() };
      gpuTicks.push(tick);
    }
    gpuNames.set(raw.id, raw.name);
    tick.stats.set(raw.id, {
      util: raw.gpu_util_pct,
      memUsed: raw.mem_used_mb / MIB_PER_GIB,
      memTotal: raw.mem_total_mb / MIB_PER_GIB,
      temp: raw.temp_c,
      power: raw.power_draw_w,
    });
    noteNewest(t, raw.timestamp);
  }

  function noteNewest(t, text) {
    if (!newest || t > newest.t) newest = { t, text };
  }

  // Only what the window shows stays; the window ends at the newest sample, not at this
  // browser's clock, which may differ from the server's.
  function trim() {
    if (!newest) return;
    const cutoff = newest.t - windowChoice.seconds;
    const firstKept = (points) => {
      const i = points.findIndex((p) => p.t >= cutoff);
      return i === -1 ? points.length : i;
    };
    sysPoints.splice(0, firstKept(sysPoints));
    gpuTicks.splice(0, firstKept(gpuTicks));
    // GPUs no longer in any tick (the driver went away) lose their line.
    const present = new Set(gpuTicks.flatMap((tick) => [...tick.stats.keys()]));
    for (const id of gpuNames.keys()) if (!present.has(id)) gpuNames.delete(id);
  }

  function reset() {
    sysPoints = [];
    gpuTicks = [];
    gpuNames = new Map();
    newest = null;
    previousNet = null;
  }

  // Polling ###############################################################################

  async function poll() {
    clearTimeout(timer);
    timer = null;
    if (inFlight) inFlight.abort();
    inFlight = null;
    if (document.hidden) return;  // visibilitychange polls again
    const controller = new AbortController();
    inFlight = controller;
    const full = fullNext || !newest;
    const path = full ? '/api/performance' : `/api/performance?after=${encodeURIComponent(newest.text)}`;
    let body;
    try {
      body = await getJSON(path, { signal: controller.signal });
    } catch (err) {
      if (controller.signal.aborted || !alive) return;
      inFlight = null;
      if (isDisabled(err)) showDisabled();
      else showError(err);
      schedule();
      return;
    }
    if (controller.signal.aborted || !alive) return;
    inFlight = null;
    if (body.enabled === false) {
      showDisabled();
    } else {
      if (full) reset();
      fullNext = false;
      const changed = ingest(body);
      showSamples(full || changed);
    }
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  // A disabled monitor answers 503 {"enabled": false}; request() makes that an ApiError
  // whose message is the body's text.
  function isDisabled(err) {
    if (err.status !== 503) return false;
    try {
      return JSON.parse(err.message).enabled === false;
    } catch {
      return false;
    }
  }

  function showDisabled() {
    error.hidden = true;
    reset();
    fullNext = true;  // when it is enabled again (config reload), start from its history
    draw();
    systemSection.hidden = true;
    gpuSection.hidden = true;
    toolbar.hidden = true;  // no window to choose
    summary.textContent = 'Performance monitoring is disabled (performance.disabled in the configuration).';
    summary.dataset.state = 'disabled';
  }

  // The charts stay as they were: a server that is away for a moment loses no history here.
  function showError(err) {
    error.textContent = `Could not read the samples: ${err.message}`;
    error.hidden = false;
  }

  function showSamples(redraw = true) {
    error.hidden = true;
    toolbar.hidden = false;
    const hasSystem = sysPoints.length > 0;
    systemSection.hidden = !hasSystem;
    gpuSection.hidden = !hasSystem;  // until the first sample, "no GPU samples" would be a guess
    summary.dataset.state = hasSystem ? 'samples' : 'waiting';
    summary.textContent = hasSystem ? summaryText() : 'Waiting for the first sample (the server takes one every few seconds)…';
    const hasGpu = gpuTicks.length > 0;
    gpuNote.hidden = hasGpu;
    gpuNote.textContent = 'No GPU samples (no NVIDIA GPU or NVML).';
    gpuGrid.hidden = !hasGpu;
    gpuList.hidden = !hasGpu;
    gpuList.textContent = [...gpuNames].sort(([a], [b]) => a - b)
      .map(([id, name]) => `GPU ${id}: ${name || 'unnamed'}`).join(' · ');
    if (redraw) draw();
  }

  function summaryText() {
    const last = sysPoints.at(-1);
    const before = sysPoints.at(-2);
    const every = before ? ` · one every ${fmtSeconds(last.t - before.t)}` : '';
    return `${sysPoints.length} sample${sysPoints.length === 1 ? '' : 's'} in view${every} · newest ${fmtTime(last.t * 1000)}`;
  }

  // Controls ##############################################################################

  windowSelect.addEventListener('change', () => {
    const wider = WINDOWS.find((w) => w.value === windowSelect.value).seconds > windowChoice.seconds;
    windowChoice = WINDOWS.find((w) => w.value === windowSelect.value);
    const url = new URL(location.href);
    url.searchParams.set('window', windowChoice.value);
    history.replaceState(null, '', url.pathname + url.search);
    if (wider) {
      fullNext = true;  // what was dropped must come again
      poll();
    } else if (newest) {
      trim();
      showSamples();
    }
  });

  function onVisibility() {
    if (!document.hidden && timer === null && inFlight === null) poll();
  }
  document.addEventListener('visibilitychange', onVisibility);

  const offs = [on('reconnected', poll)];
  poll();

  return () => {
    alive = false;
    clearTimeout(timer);
    if (inFlight) inFlight.abort();
    sizing.stop();
    darkQuery.removeEventListener('change', rebuildForTheme);
    document.removeEventListener('visibilitychange', onVisibility);
    offs.forEach((off) => off());
    for (const chart of charts) destroyPlot(chart);
  };
}

// Theme ###################################################################################

function readTheme() {
  const style = getComputedStyle(document.documentElement);
  const css = (name) => style.getPropertyValue(name).trim();
  return {
    muted: css('--muted'),
    grid: css('--border'),
    font: `12px ${getComputedStyle(document.body).fontFamily}`,
    colours: PALETTE.map(css),
  };
}

// The y axis as wide as its longest label ("12.5 GiB", "750 kB/s"), measured in its font:
// a fixed width either clips long labels or wastes a phone's width on short ones.
const measure = document.createElement('canvas').getContext('2d');
const MIN_AXIS_PX = 52;

function axisSize(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 1) return axis._size;  // settled: uPlot asks again while it converges
  measure.font = axis.font[0];
  const widest = Math.max(0, ...(values || []).map((text) => measure.measureText(text).width));
  // At least MIN_AXIS_PX: the time axis' first label ("12/6/26 12:10pm") is centred under
  // the plot's left edge and needs room to its left.
  return Math.max(MIN_AXIS_PX, Math.ceil(widest / devicePixelRatio) + axis.ticks.size + axis.gap + 6);
}

// Numbers #################################################################################

// Each format: `value` for the legend, `axis` for the y axis' labels.
const percentFormat = { value: (v) => `${v.toFixed(1)} %`, axis: (v) => `${v} %` };
const loadFormat = { value: (v) => v.toFixed(2), axis: (v) => String(v) };

const gibFormat = { value: (gib) => `${gib.toFixed(1)} GiB`, axis: (gib) => `${trimNumber(gib)} GiB` };

// Network rates in decimal units, as network speeds are quoted.
const RATE_UNITS = ['B/s', 'kB/s', 'MB/s', 'GB/s'];
const rateFormat = { value: (v) => rate(v, 1), axis: (v) => rate(v, 2) };

function rate(bytesPerSecond, decimals) {
  let value = bytesPerSecond;
  let unit = 0;
  while (value >= 1000 && unit < RATE_UNITS.length - 1) { value /= 1000; unit += 1; }
  return `${trimNumber(value, decimals)} ${RATE_UNITS[unit]}`;
}

function unitFormat(unit) {
  return { value: (v) => `${trimNumber(v, 1)} ${unit}`, axis: (v) => `${trimNumber(v)} ${unit}` };
}

// At most `decimals` decimals, none when they are zeros: 2 -> "2", 2.5 -> "2.5".
function trimNumber(value, decimals = 2) {
  return String(Number(value.toFixed(decimals)));
}

// A y range from 0 to a little above the highest value (1 when all are 0).
function fromZero(min, max) {
  return [0, max > 0 ? max * 1.15 : 1];
}

// The legend asks for the values at no index while the pointer is off the chart.
function atRest(idx) {
  return idx === null || idx === undefined;
}

function clock(secondsValue) {
  return secondsValue === undefined || secondsValue === null ? '—' : fmtClock(secondsValue * 1000);
}

// Bytes per second through the interfaces there both times; an interface whose counter went
// back (it was re-created) is left out rather than read as a huge negative rate.
function netRates(before, after, elapsed) {
  if (!(elapsed > 0)) return { rx: null, tx: null };
  let rx = 0;
  let tx = 0;
  for (const [name, [received, sent]] of after) {
    const old = before.get(name);
    if (!old || received < old[0] || sent < old[1]) continue;
    rx += received - old[0];
    tx += sent - old[1];
  }
  return { rx: rx / elapsed, tx: tx / elapsed };
}

// An RFC 3339 time as Unix seconds, to the microsecond (Date.parse stops at milliseconds,
// and two samples of one second must never read as one): the whole seconds from Date.parse,
// the fraction from its digits. Null when unreadable.
const RFC3339 = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$/;

function seconds(text) {
  const match = RFC3339.exec(text || '');
  if (!match) return null;
  const whole = Date.parse(match[1] + match[3]);
  return isNaN(whole) ? null : whole / 1000 + Number(`0${match[2] || ''}`);
}
