// Timeline page: "why was my model unloaded at 14:02?" at a glance. One lane per model with
// its states as coloured segments (ready with requests in flight shows as serving), each swap
// as a marker on the lane of the model it started and of those it stopped (its reason, the
// request and the key that caused it: title on hover, the details panel on click, tap or
// keyboard focus), the requests waiting for a model over time as a stacked chart under the
// lanes, and a plain list of the latest state changes, newest first, in words.
//
// Data: GET /api/timeline (the server's last hour: entries, and each model's state before
// the first), then `timeline` events; GET /api/swaps, then `swap` events (a record is sent
// again, same id, when it is done). After a lost event stream, only what is newer than the
// last answer is asked for (?after=). Entries older than the chosen window are dropped as the
// window moves on (their effect kept as the state each lane starts in), so a page left open
// for days holds one window of entries.
//
// Drawing: each lane is an SVG whose x coordinate is seconds since the page opened; the
// segments are built again when entries change (at most once a second), and every second
// only the viewBox moves (the open segment runs far to the right and is clipped at "now").
// Times are shown in the browser's local time.

import { getJSON, on, live } from '/ui/api.js';
import { h, replace, field, fmtSeconds } from '/ui/dom.js';

const WINDOWS = [
  { value: '5m', label: '5 min', seconds: 300, step: 60 },
  { value: '15m', label: '15 min', seconds: 900, step: 180 },
  { value: '1h', label: '1 h', seconds: 3600, step: 600 },
];
const DEFAULT_WINDOW = '1h';
// Legend order; `serving` is a ready model with requests in flight.
const STATES = [
  ['stopped', 'stopped'], ['starting', 'starting'], ['ready', 'ready, idle'], ['serving', 'serving requests'],
  ['sleeping', 'sleeping'], ['waking', 'waking'], ['stopping', 'stopping'],
];
const TICK_MS = 1000;          // the axis moves on, and changes are drawn, at most this often
const RETRY_MS = 5000;         // after a failed read of the history
const OVERLAP_S = 2;           // a refetch after a lost stream overlaps what we have by this much
const KEEP_MARGIN_S = 5;       // entries kept a little past the window's left edge
const SLACK_S = 0.5;           // a swap is decided just before the state changes it causes
const MATCH_S = 900;           // a stop is never matched to a swap decided longer ago than this
const SEGMENTS_PER_LANE = 1500;  // segments narrower than window/this are widened and merged
const LIST_MAX = 100;          // state changes listed in words
const LABEL_PX = 72;           // room for one label on the time axis ("12:50 PM")
const FAR_S = 1e7;             // an open segment runs this far to the right (clipped at now)
const PALETTE = ['--chart-1', '--chart-2', '--chart-3', '--chart-4', '--chart-5', '--chart-6', '--chart-7', '--chart-8'];
const SVG_NS = 'http://www.w3.org/2000/svg';

export function mount(root, { query }) {
  let alive = true;
  let win = WINDOWS.find((w) => w.value === query.get('window')) || WINDOWS.find((w) => w.value === DEFAULT_WINDOW);
  const origin = Math.floor(Date.now() / 1000);  // x = 0 in every SVG; keeps coordinates small

  // Kept data ##############################################################################

  let entries = [];                 // timeline entries in the window, oldest first (by `at`)
  let known = new Map();            // id -> entry, of the server run we hear from now
  let maxId = 0;                    // the highest id of that run
  const beforeState = new Map();    // model -> {state, at, reason}: its state where `entries` begin
  const servingBefore = new Map();  // model -> whether it served requests there
  const queueBefore = new Map();    // model -> requests waiting for it there
  const swaps = new Map();          // `${id}@${time}` -> record (with t: unix seconds)
  let offset = null;                // the server's clock minus this browser's, in seconds
  let lastNow = 0;                  // `now` of the last answer, for ?after=
  let loaded = false;
  let dirty = false;                // something changed since the lanes were drawn
  let buffer = null;                // events that came while a read was under way
  let inFlight = null;              // its AbortController
  let retryTimer = null;
  let selected = null;              // the swap shown in the details panel (its key)

  // Page ###################################################################################

  const windowSelect = h('select', { 'data-testid': 'tl-window' }, WINDOWS.map((w) => h('option', { value: w.value }, w.label)));
  windowSelect.value = win.value;
  const summary = h('p', { class: 'muted', 'data-testid': 'tl-summary' }, 'Loading the last hour…');
  const error = h('p', { class: 'error-text', hidden: true, 'data-testid': 'tl-error' });
  const legend = h('div', { class: 'tl-legend', 'data-testid': 'tl-legend', 'aria-label': 'Legend' },
    STATES.map(([state, label]) => h('span', { class: 'tl-key' }, swatch(state), label)),
    h('span', { class: 'tl-key' }, h('span', { class: 'tl-marker-sample tl-marker-start', 'aria-hidden': 'true' }), 'started or woken'),
    h('span', { class: 'tl-key' }, h('span', { class: 'tl-marker-sample tl-marker-stop', 'aria-hidden': 'true' }), 'stopped or put to sleep'));

  const grid = h('div', { class: 'tl-grid', 'aria-hidden': 'true' });
  const lanesBox = h('div', { class: 'tl-lanes', 'data-testid': 'tl-lanes' });
  const ticks = h('div', { class: 'tl-ticks', 'data-testid': 'tl-axis' });
  const queueSvg = svgEl('svg', { class: 'tl-queue-chart', preserveAspectRatio: 'none', role: 'img', 'aria-label': 'Requests waiting' });
  const queueMax = h('span', { class: 'tl-now muted', 'data-testid': 'tl-queue-max' });
  const queuePeak = h('p', { class: 'tl-queue-peak muted', 'data-testid': 'tl-queue-peak' });
  const queueLegend = h('div', { class: 'tl-legend tl-queue-legend' });
  const rows = h('div', { class: 'tl-rows', 'data-testid': 'tl-chart' },
    grid,
    lanesBox,
    h('div', { class: 'tl-row tl-axis' }, h('div', { class: 'tl-label muted' }, 'time'), ticks),
    h('div', { class: 'tl-row tl-queue' },
      h('div', { class: 'tl-label' }, h('span', {}, 'waiting'), queueMax),
      h('div', { class: 'tl-queue-track' }, queueSvg)));
  const noModels = h('p', { class: 'empty', hidden: true }, 'No models yet.');

  const detailsBody = h('div');
  const details = h('section', { class: 'panel tl-details', hidden: true, 'data-testid': 'tl-details', 'aria-live': 'polite', 'aria-label': 'Swap details' },
    h('div', { class: 'tl-details-head' }, h('h2', {}, 'Swap'),
      h('button', { type: 'button', class: 'small', 'aria-label': 'Close the details', onclick: closeDetails }, 'Close')),
    detailsBody);

  const list = h('ol', { class: 'tl-list', 'data-testid': 'tl-list', 'aria-label': 'Latest state changes, newest first' });
  const listEmpty = h('p', { class: 'empty', 'data-testid': 'tl-list-empty', hidden: true }, 'No state changes in this window.');

  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Timeline'),
      h('div', { class: 'toolbar tl-toolbar' }, field('Window', windowSelect))),
    summary,
    error,
    legend,
    h('section', { class: 'panel tl-panel', 'aria-label': 'Lanes' }, rows, noModels, queuePeak, queueLegend),
    details,
    h('h2', {}, 'Latest changes'),
    list,
    listEmpty);

  // Lanes by model; each {row, label, now, svg, marks, markers: [{el, t}]}.
  const lanes = new Map();

  // Entries ################################################################################

  function serverNow() {
    return Date.now() / 1000 + (offset ?? 0);
  }

  function cutoff() {
    return serverNow() - win.seconds - KEEP_MARGIN_S;
  }

  // A timeline entry from the answer or an event: a state change, or a `load` entry (one second
  // of a model's requests: serving and waiting, each [most, last]). One with a known id is a
  // load entry sent again with new figures; ids going back (or a known id of another kind)
  // mean the server was restarted and counts from 1 again: what we have stays, as history.
  function addEntry(raw) {
    if (!raw || typeof raw.id !== 'number' || typeof raw.at !== 'number' || typeof raw.model !== 'string') return;
    const had = known.get(raw.id);
    if (had) {
      if (had.kind === raw.kind && had.model === raw.model && had.at === raw.at) {
        if (raw.kind === 'load') {
          Object.assign(had, { serving: raw.serving, waiting: raw.waiting, open: raw.open });
          dirty = true;
        }
        return;
      }
      restarted();
    } else if (raw.id <= maxId) {
      if (raw.at > newestAt()) restarted();
      else if (raw.at < cutoff()) return;  // dropped already
    }
    const entry = { ...raw };
    known.set(entry.id, entry);
    maxId = Math.max(maxId, entry.id);
    if (offset !== null && entry.at > serverNow()) offset += entry.at - serverNow();
    if (!entries.length || entries.at(-1).at <= entry.at) {
      entries.push(entry);
    } else {
      let lo = 0;
      let hi = entries.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (entries[mid].at <= entry.at) lo = mid + 1;
        else hi = mid;
      }
      entries.splice(lo, 0, entry);
    }
    dirty = true;
  }

  function restarted() {
    known = new Map();
    maxId = 0;
  }

  function newestAt() {
    return entries.length ? entries.at(-1).at : 0;
  }

  function addSwap(raw) {
    if (!raw || typeof raw.id !== 'number') return;
    const t = Date.parse(raw.time) / 1000;
    if (!isFinite(t)) return;
    swaps.set(`${raw.id}@${raw.time}`, { ...raw, t, key: raw.key || '', stops: raw.stops || [], swapKey: `${raw.id}@${raw.time}` });
    dirty = true;
  }

  // Entries that fell out of the window leave their mark on the state each lane starts in.
  function trim() {
    const edge = cutoff();
    let n = 0;
    while (n < entries.length && entries[n].at < edge) {
      const entry = entries[n];
      if (entry.kind === 'state') beforeState.set(entry.model, { state: entry.state, at: entry.at, reason: entry.reason || '' });
      else if (entry.kind === 'load') {
        servingBefore.set(entry.model, entry.serving[1] > 0);
        queueBefore.set(entry.model, entry.waiting[1]);
      }
      if (known.get(entry.id) === entry) known.delete(entry.id);
      n += 1;
    }
    if (n) {
      entries.splice(0, n);
      dirty = true;
    }
    for (const [key, record] of swaps) {
      if (record.t < edge - MATCH_S) {
        swaps.delete(key);
        dirty = true;
      }
    }
  }

  function reset() {
    entries = [];
    restarted();
    beforeState.clear();
    servingBefore.clear();
    queueBefore.clear();
    swaps.clear();
  }

  // Reading ################################################################################

  // full: everything the server keeps (first load, a wider window); else what is newer than
  // the last answer (the stream was lost for a while).
  async function load(full) {
    clearTimeout(retryTimer);
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    buffer ??= [];
    const incremental = !full && loaded;
    const after = incremental ? Math.max(0, Math.max(lastNow, newestAt()) - OVERLAP_S) : 0;
    let answer;
    let swapAnswer;
    try {
      [answer, swapAnswer] = await Promise.all([
        getJSON(`/api/timeline?after=${after}`, { signal: controller.signal }),
        getJSON('/api/swaps', { signal: controller.signal }).catch((err) => {
          if (controller.signal.aborted) throw err;
          return null;  // a key without the right to it: lanes without markers
        }),
      ]);
    } catch (err) {
      if (controller.signal.aborted || !alive) return;
      inFlight = null;
      flushBuffer();
      error.textContent = `Could not read the timeline: ${err.message}`;
      error.hidden = false;
      if (!loaded) summary.textContent = 'No timeline yet.';
      retryTimer = setTimeout(() => load(full), RETRY_MS);
      return;
    }
    if (controller.signal.aborted || !alive) return;
    inFlight = null;
    error.hidden = true;
    offset = answer.now - Date.now() / 1000;
    lastNow = answer.now;
    if (!incremental) reset();
    for (const [model, state] of Object.entries(answer.before || {})) {
      const fresh = !incremental || !entries.some((e) => e.model === model);
      if (state.state && (!incremental || (!beforeState.has(model) && fresh))) {
        beforeState.set(model, { state: state.state, at: state.at, reason: state.reason || '' });
      }
      if (fresh && state.serving !== undefined) servingBefore.set(model, state.serving > 0);
      if (fresh && state.waiting !== undefined) queueBefore.set(model, state.waiting);
    }
    for (const entry of answer.entries || []) addEntry(entry);
    for (const record of swapAnswer?.swaps || []) addSwap(record);
    flushBuffer();
    loaded = true;
    trim();
    rebuild();
  }

  function flushBuffer() {
    const held = buffer || [];
    buffer = null;
    for (const [topic, data] of held) (topic === 'swap' ? addSwap : addEntry)(data);
  }

  function onEvent(topic) {
    return (data) => {
      if (buffer) buffer.push([topic, data]);
      else if (topic === 'swap') addSwap(data);
      else addEntry(data);
    };
  }

  // Drawing ################################################################################

  function laneModels() {
    const ids = [];
    const seen = new Set();
    const add = (id) => {
      if (id && !seen.has(id)) {
        seen.add(id);
        ids.push(id);
      }
    };
    for (const model of live.models || []) if (!model.peerID) add(model.id);
    const more = new Set([...beforeState.keys(), ...entries.map((e) => e.model)]);
    for (const record of swaps.values()) {
      more.add(record.model);
      for (const stop of record.stops) more.add(stop.model);
    }
    more.delete('');
    for (const id of [...more].sort()) add(id);
    return ids;
  }

  function lane(model) {
    let entry = lanes.get(model);
    if (entry) return entry;
    const now = h('span', { class: 'tl-now', 'data-testid': `tl-state-${model}` });
    const svg = svgEl('svg', { class: 'tl-bars', preserveAspectRatio: 'none', role: 'img' });
    const marks = h('div', { class: 'tl-marks' });
    const row = h('div', { class: 'tl-row tl-lane', 'data-testid': `tl-lane-${model}` },
      h('div', { class: 'tl-label' }, h('span', { class: 'tl-name', title: model }, model), now),
      h('div', { class: 'tl-track' }, svg, marks));
    entry = { row, now, svg, marks, markers: [], byKey: new Map() };
    lanes.set(model, entry);
    return entry;
  }

  // Everything drawn again from the kept data.
  function rebuild() {
    dirty = false;
    const now = serverNow();
    const start = now - win.seconds;
    const models = laneModels();
    const byModel = new Map(models.map((m) => [m, []]));
    for (const entry of entries) byModel.get(entry.model)?.push(entry);
    const swapList = [...swaps.values()].sort((a, b) => a.t - b.t);

    for (const [model, item] of lanes) {
      if (!byModel.has(model)) {
        item.row.remove();
        lanes.delete(model);
      }
    }
    noModels.hidden = models.length > 0;
    const statusOf = new Map((live.models || []).map((m) => [m.id, m.state]));
    const quantum = win.seconds / SEGMENTS_PER_LANE;
    for (const [index, model] of models.entries()) {
      const item = lane(model);
      // Moved only when out of order: moving a row would take the focus off its markers.
      if (lanesBox.children[index] !== item.row) lanesBox.insertBefore(item.row, lanesBox.children[index] || null);
      const segments = segmentsOf(model, byModel.get(model));
      replace(item.svg, merge(segments, quantum).map((s) => svgEl('rect', {
        class: `tl-s-${s.state}`, x: s.t0 - origin, width: s.t1 - s.t0, y: 0, height: 1,
      }, svgEl('title', {}, segmentTitle(model, s)))));
      const current = statusOf.get(model) || segments.at(-1)?.state || 'unknown';
      item.now.textContent = current;
      item.now.className = `tl-now state-${current}`;
      const last = segments.at(-1);
      item.svg.setAttribute('aria-label', last
        ? `${model}: ${STATE_WORDS[last.state] || last.state} since ${last.t0 < start ? 'before the window' : clock(last.t0)}`
        : `${model}: nothing known`);
      drawMarkers(model, item, swapList);
    }

    drawQueue(models, byModel, start, now);
    drawList(models, byModel, swapList, start);
    const changes = entries.filter((e) => e.kind === 'state' && e.at >= start).length;
    const swapCount = swapList.filter((r) => r.t >= start).length;
    summary.textContent = `${models.length} model${plural(models.length)} · ${changes} state change${plural(changes)} · ` +
      `${swapCount} swap${plural(swapCount)} in the last ${win.label}`;
    rows.dataset.spanS = String(win.seconds);
    showDetails();
    advance();
  }

  // A model's states as segments {t0, t1, state, reason, since} (the last runs to FAR).
  function segmentsOf(model, list) {
    const before = beforeState.get(model);
    let state = before?.state ?? null;
    let reason = before?.reason ?? '';
    if (state === null) {
      const first = list.find((e) => e.kind === 'state');
      // Every model starts stopped; one whose first change is not a start is unknown until it.
      if (!first || first.state === 'starting') state = 'stopped';
    }
    let serving = servingBefore.get(model) ?? false;
    const shown = () => (state === 'ready' && serving ? 'serving' : state);
    const out = [];
    let segment = { t0: origin - FAR_S, state: shown(), reason, since: before?.at ?? null };
    for (const change of changesOf(list)) {
      if (change.state !== undefined) {
        state = change.state;
        reason = change.reason || '';
      } else {
        serving = change.serving;
      }
      if (shown() === segment.state) continue;
      if (segment.state !== null) out.push({ ...segment, t1: change.at });
      segment = { t0: change.at, state: shown(), reason, since: change.at };
    }
    if (segment.state !== null) out.push({ ...segment, t1: origin + FAR_S, open: true });
    return out;
  }

  // Bounded drawing: segments at least `quantum` wide are drawn as they are (adjacent ones of
  // one state as one); a run of narrower ones becomes one segment of at least `quantum`, in
  // the colour of its most telling state (a request of 50 ms still shows on an hour), drawn
  // over its neighbours. A lane then has at most about SEGMENTS_PER_LANE times two rects.
  function merge(segments, quantum) {
    const long = [];
    const runs = [];
    let run = null;
    for (const segment of segments) {
      if (segment.t1 - segment.t0 >= quantum) {
        run = null;
        const last = long.at(-1);
        if (last && last.state === segment.state && segment.t0 - last.t1 < 1e-6) {
          last.t1 = segment.t1;
          last.open = segment.open;
        } else {
          long.push({ ...segment });
        }
      } else if (run && run.t1 - run.t0 < quantum && segment.t0 - run.t1 < 1e-6) {
        run.t1 = segment.t1;
        run.states.add(segment.state);
        if (PRIORITY.indexOf(segment.state) < PRIORITY.indexOf(run.state)) run.state = segment.state;
      } else {
        run = { ...segment, states: new Set([segment.state]) };
        runs.push(run);
      }
    }
    for (const r of runs) r.t1 = Math.max(r.t1, r.t0 + quantum);
    return [...long, ...runs];
  }

  function segmentTitle(model, s) {
    const from = s.t0 <= origin - FAR_S + 1 ? (s.since ? clock(s.since) : 'before') : clock(s.t0);
    const to = s.open ? 'now' : clock(s.t1);
    const what = s.states?.size > 1 ? [...s.states].map((state) => STATE_WORDS[state] || state).join(', then ')
      : STATE_WORDS[s.state] || s.state;
    return `${model}: ${what}, ${from} – ${to}${s.reason && !(s.states?.size > 1) ? ` (${s.reason})` : ''}`;
  }

  // Markers: a swap on the lane of the model it started or woke and on each it stopped. The
  // buttons are kept from one drawing to the next (and never moved), so focus stays on them.
  function drawMarkers(model, item, swapList) {
    const kept = new Map();
    const markers = [];
    for (const record of swapList) {
      let role = null;
      if (record.model === model) role = record.action === 'wake' ? 'wake' : 'start';
      const stop = record.stops.find((s) => s.model === model);
      if (stop) role = stop.action === 'sleep' ? 'sleep' : 'stop';
      if (!role) continue;
      const key = record.swapKey;
      let el = item.byKey.get(key);
      if (!el) {
        el = h('button', {
          type: 'button', 'data-testid': `tl-marker-${model}`, 'data-key': key,
          onclick: () => choose(key), onfocus: () => choose(key),
        });
        item.marks.append(el);
      }
      el.className = `tl-marker tl-marker-${role}${selected === key ? ' selected' : ''}`;
      el.title = swapTooltip(record);
      el.setAttribute('aria-label', swapHeadline(record, model));
      kept.set(key, el);
      markers.push({ el, t: record.t });
    }
    for (const [key, el] of item.byKey) if (!kept.has(key)) el.remove();
    item.byKey = kept;
    item.markers = markers;
  }

  // Queue depth: per model a step function of its waiting requests (a second's most, then
  // its last until the next figure), stacked, one colour per model. The server keeps each
  // model's most per second, and two models' mosts in one second need not have come at once:
  // the stack's height is an upper bound, so the words name the most for one model.
  function drawQueue(models, byModel, start, now) {
    const series = [];
    let peak = { most: 0, where: [] };  // the most waiting for one model, and [model, t] that reached it
    const reached = (model, most, t) => {
      if (most > peak.most) peak = { most, where: [[model, t]] };
      else if (most > 0 && most === peak.most && !peak.where.some(([m]) => m === model)) peak.where.push([model, t]);
    };
    for (const [index, model] of models.entries()) {
      const points = [];  // [t, value], time order; a later figure for the same t wins
      const first = queueBefore.get(model) || 0;
      if (first) {
        points.push([origin - FAR_S, first]);
        reached(model, first, start);
      }
      for (const entry of byModel.get(model)) {
        if (entry.kind !== 'load') continue;
        const [most, last] = entry.waiting;
        if (points.length && points.at(-1)[0] >= entry.second) points.pop();
        points.push([entry.second, most], [entry.second + 1, last]);
        if (entry.second + 1 > start && entry.second <= now) reached(model, most, entry.second);
      }
      if (points.length) series.push({ model, points, colour: PALETTE[index % PALETTE.length] });
    }
    const times = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const cursor = series.map(() => 0);
    const values = series.map(() => 0);
    const totals = [];   // per time: cumulative heights, one per series
    let top = 0;         // the stack's highest in the window: the chart's scale
    for (const [i, t] of times.entries()) {
      series.forEach((s, k) => {
        while (cursor[k] < s.points.length && s.points[cursor[k]][0] <= t) values[k] = s.points[cursor[k]++][1];
      });
      let sum = 0;
      totals.push(values.map((v) => (sum += v)));
      if (sum > top && (times[i + 1] ?? Infinity) > start && t <= now) top = sum;
    }
    const height = Math.max(1, top) * 1.15;
    queueSvg.dataset.height = String(height);
    queueMax.textContent = `0 to ${top}`;
    replace(queueSvg, series.map((s, k) => {
      let d = '';
      let previous = 0;
      for (const [i, t] of times.entries()) {
        const v = totals[i][k];
        const x = t - origin;
        d += d ? `L${x} ${height - previous}L${x} ${height - v}` : `M${x} ${height}L${x} ${height - v}`;
        previous = v;
      }
      if (d) d += `L${FAR_S} ${height - previous}L${FAR_S} ${height}Z`;
      return svgEl('path', { d, style: `fill: var(${s.colour})`, class: 'tl-queue-area' },
        svgEl('title', {}, `waiting for ${s.model}`));
    }).reverse());  // the tallest (last) layer first, the others over it
    queuePeak.textContent = peak.most > 0
      ? `Most requests waiting for one model: ${peak.most} (${peak.where.map(([m, t]) => `${m} at ${clock(t)}`).join(', ')})`
      : 'No request waited in this window.';
    queuePeak.dataset.peak = String(peak.most);
    replace(queueLegend, series.length > 1 ? series.map((s) => h('span', { class: 'tl-key' },
      h('span', { class: 'tl-chip', style: `background: var(${s.colour})`, 'aria-hidden': 'true' }), s.model)) : null);
  }

  // The latest state changes in words, newest first, each with the swap that caused it.
  function drawList(models, byModel, swapList, start) {
    const lines = [];
    for (const model of models) {
      let lastUp = -Infinity;  // its latest starting or waking
      let upAt = null;
      for (const entry of byModel.get(model)) {
        if (entry.kind !== 'state') continue;
        if (entry.at >= start) lines.push({ entry, text: describe(entry, swapList, lastUp, upAt) });
        if (entry.state === 'starting' || entry.state === 'waking') {
          lastUp = entry.at;
          upAt = entry;
        }
      }
    }
    lines.sort((a, b) => b.entry.at - a.entry.at || b.entry.id - a.entry.id);
    const shown = lines.slice(0, LIST_MAX);
    replace(list, shown.map(({ entry, text }) => h('li', { 'data-testid': 'tl-item', 'data-model': entry.model, 'data-state': entry.state },
      h('time', { class: 'tl-time', datetime: new Date(entry.at * 1000).toISOString() }, clock(entry.at)), ' ', text)));
    listEmpty.hidden = shown.length > 0;
  }

  function describe(entry, swapList, lastUp, upAt) {
    const model = entry.model;
    const head = `${model} ${entry.state}`;
    if (entry.state === 'starting' || entry.state === 'waking') {
      const record = latest(swapList, (r) => r.model === model && r.t <= entry.at + SLACK_S && r.t > lastUp + 0.001 &&
        r.t >= entry.at - MATCH_S);
      if (!record) return head;
      const made = record.stops.map((s) => `${s.model} ${s.action === 'sleep' ? 'put to sleep' : 'stopped'}`);
      return `${head} — for ${causedBy(record) || 'a request'}${made.length ? `; ${made.join(', ')} to make room` : ''}`;
    }
    if (entry.state === 'ready' && upAt) {
      return `${head} — ${upAt.state === 'waking' ? 'woke' : 'loaded'} in ${fmtSeconds(entry.at - upAt.at)}`;
    }
    if (entry.state === 'stopping' || entry.state === 'stopped' || entry.state === 'sleeping') {
      const record = latest(swapList, (r) => r.t <= entry.at + SLACK_S && r.t >= Math.max(lastUp, entry.at - MATCH_S) &&
        r.stops.some((s) => s.model === model));
      const stop = record?.stops.find((s) => s.model === model);
      let text = entry.reason || '';
      if (record?.model) text += `${text ? ' ' : ''}for ${record.model}`;
      const by = record ? causedBy(record) : '';
      if (by) text += ` (${by})`;
      if (stop?.why) text += ` · ${stop.why}`;
      return text ? `${head} — ${text}` : head;
    }
    return entry.reason ? `${head} — ${entry.reason}` : head;
  }

  // Every second: the window moves on (viewBoxes, markers, the axis); nothing is rebuilt.
  function advance() {
    const now = serverNow();
    const start = now - win.seconds;
    const x = start - origin;
    for (const item of lanes.values()) {
      item.svg.setAttribute('viewBox', `${x} 0 ${win.seconds} 1`);
      for (const marker of item.markers) {
        const p = (marker.t - start) / win.seconds;
        marker.el.hidden = p < 0 || p > 1.01;
        marker.el.style.left = `${(Math.min(p, 1) * 100).toFixed(3)}%`;
      }
    }
    queueSvg.setAttribute('viewBox', `${x} 0 ${win.seconds} ${queueSvg.dataset.height || 1}`);
    // A grid line at every step; a label at as many as have room for one (a phone: fewer).
    // None so near an edge that half of it would be cut off.
    const width = ticks.clientWidth || 600;
    const every = Math.max(1, Math.ceil(LABEL_PX / ((width * win.step) / win.seconds)));
    const labels = [];
    const lines = [];
    for (let t = Math.ceil(start / win.step) * win.step; t <= now; t += win.step) {
      const p = (t - start) / win.seconds;
      const left = `${(p * 100).toFixed(3)}%`;
      lines.push(h('span', { class: 'tl-gridline', style: `left: ${left}` }));
      const room = p * width >= LABEL_PX / 2 - 8 && (1 - p) * width >= LABEL_PX / 2 - 8;
      if (room && Math.round(t / win.step) % every === 0) {
        labels.push(h('span', { class: 'tl-tick', style: `left: ${left}` }, shortClock(t)));
      }
    }
    replace(ticks, labels);
    replace(grid, lines);
  }

  // Details ################################################################################

  function choose(key) {
    if (selected === key && !details.hidden) return;
    selected = key;
    for (const item of lanes.values()) {
      for (const marker of item.markers) {
        marker.el.classList.toggle('selected', marker.el.dataset.key === key);
      }
    }
    showDetails();
  }

  function closeDetails() {
    selected = null;
    details.hidden = true;
    for (const item of lanes.values()) for (const marker of item.markers) marker.el.classList.remove('selected');
  }

  function showDetails() {
    const record = selected ? swaps.get(selected) : null;
    if (!record) {
      details.hidden = true;
      return;
    }
    const facts = [['When', `${clock(record.t)} (${record.kind})`]];
    if (record.model) facts.push([record.action === 'wake' ? 'Woke' : 'Started', record.model]);
    for (const stop of record.stops) {
      facts.push([stop.action === 'sleep' ? 'Put to sleep' : 'Stopped', `${stop.model}${stop.why ? ` — ${stop.why}` : ''}`]);
    }
    facts.push(['Request', record.request || '—'], ['Key', record.key || '—']);
    if (typeof record.expected_s === 'number') facts.push(['Expected', fmtSeconds(record.expected_s)]);
    if (typeof record.duration_s === 'number') facts.push(['Took', fmtSeconds(record.duration_s)]);
    facts.push(['Result', record.result || '—']);
    replace(detailsBody, h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])));
    details.hidden = false;
  }

  // Controls and lifetime ##################################################################

  windowSelect.addEventListener('change', () => {
    const next = WINDOWS.find((w) => w.value === windowSelect.value);
    const wider = next.seconds > win.seconds;
    win = next;
    const url = new URL(location.href);
    url.searchParams.set('window', win.value);
    history.replaceState(null, '', url.pathname + url.search);
    if (wider) {
      load(true);  // what was dropped must come again
    } else if (loaded) {
      trim();
      rebuild();
    }
  });

  let knownModels = '';
  function onModels(models) {
    const ids = (models || []).filter((m) => !m.peerID).map((m) => `${m.id}=${m.state}`).join('|');
    if (ids !== knownModels) {
      knownModels = ids;
      dirty = true;
    }
  }

  const tick = setInterval(() => {
    if (!loaded) return;
    trim();
    if (document.hidden) return;
    if (dirty) rebuild();
    else advance();
  }, TICK_MS);

  const offs = [
    on('timeline', onEvent('timeline')),
    on('swap', onEvent('swap')),
    on('modelStatus', onModels),
    on('reconnected', () => load(false)),
  ];
  onModels(live.models);
  load(true);

  return () => {
    alive = false;
    clearInterval(tick);
    clearTimeout(retryTimer);
    if (inFlight) inFlight.abort();
    offs.forEach((off) => off());
  };
}

// Words ###################################################################################

const STATE_WORDS = Object.fromEntries(STATES);
// Which state a run of short segments shows: the one that says most.
// A lane's changes in time order: each state entry, and for each second of load the requests
// served from its start (the most) and from its end (the last, once the second is over).
function changesOf(list) {
  const changes = [];
  for (const entry of list) {
    if (entry.kind === 'state') changes.push({ at: entry.at, state: entry.state, reason: entry.reason });
    else if (entry.kind === 'load') {
      changes.push({ at: entry.at, serving: entry.serving[0] > 0 });
      if (!entry.open) changes.push({ at: Math.max(entry.at, entry.second + 1), serving: entry.serving[1] > 0 });
    }
  }
  return changes.sort((a, b) => a.at - b.at);
}

const PRIORITY = ['serving', 'starting', 'waking', 'stopping', 'ready', 'sleeping', 'stopped'];

// Who asked for it: "POST /v1/chat/completions from 10.0.0.2, key agents".
function causedBy(record) {
  return [record.request ? `request ${record.request}` : '', record.key ? `key ${record.key}` : ''].filter(Boolean).join(', ');
}

function swapHeadline(record, model) {
  const parts = [];
  if (record.model) parts.push(`${record.model} ${record.action === 'wake' ? 'woken' : 'started'}`);
  for (const stop of record.stops) parts.push(`${stop.model} ${stop.action === 'sleep' ? 'put to sleep' : 'stopped'}`);
  const what = record.kind === 'swap' ? 'Swap' : record.kind === 'ttl' ? 'TTL' : record.kind === 'unload' ? 'Unload' : 'Reload';
  return `${what} at ${clock(record.t)}: ${parts.join(', ') || model}`;
}

function swapTooltip(record) {
  const lines = [swapHeadline(record, '')];
  for (const stop of record.stops) if (stop.why) lines.push(`${stop.model}: ${stop.why}`);
  const by = causedBy(record);
  if (by) lines.push(by);
  if (record.result && record.result !== 'ok') lines.push(`result: ${record.result}`);
  return lines.join('\n');
}

function latest(records, test) {
  for (let i = records.length - 1; i >= 0; i -= 1) if (test(records[i])) return records[i];
  return null;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function shortClock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: 'numeric', minute: '2-digit' });
}

function plural(n) {
  return n === 1 ? '' : 's';
}

// SVG #####################################################################################

function svgEl(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  for (const child of children) element.append(child);
  return element;
}

function swatch(state) {
  return svgEl('svg', { class: 'tl-swatch', width: 14, height: 10, viewBox: '0 0 14 10', 'aria-hidden': 'true' },
    svgEl('rect', { class: `tl-s-${state}`, x: 0, y: 0, width: 14, height: 10, rx: 2 }));
}
