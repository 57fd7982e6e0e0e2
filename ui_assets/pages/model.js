// Model page (/ui/model/<id>): everything known of one model, from GET /api/models/<id>: its
// state and why, Load (Wake) and Unload, how far a start has got or why it failed; what a
// request would do now (the plan); its swaps (what started or stopped it, why, for which
// request); its load and wake times and the memory it was measured to hold; its names, group
// and TTL; its settings as loaded (secrets masked by the server). Below: the model's own output
// live (/logs/stream/<id>) and its recent requests (/api/metrics/activity?model=<id>).
//
// Kept live by events: modelStatus (its state and loading progress at once; the detail is
// fetched again when any model's state changes, since the plan depends on what else runs),
// swap, activity and reconnected; and by a fetch every few seconds as a fallback. An ID the
// server does not know (404) says so, with the way back to the models page.

import { getJSON, request, postJSON, on, live, modelPath, streamText, lineSplitter } from '/ui/api.js';
import { h, replace, toast, fmtSeconds, fmtBytes, fmtTime, fmtMs, fmtCount, fmtSpeed, coalesce } from '/ui/dom.js';
import { renderAnsi, AnsiState } from '/ui/ansi.js';

const LOG_LINES = 500;
const ACTIVITY_ROWS = 20;
const POLL_MS = 5000;
const LOG_RETRY_MS = 2000;

export function mount(root, { rest }) {
  const asked = rest || '';  // as in the address: an ID, or an alias of one
  let id = null;             // the model's own ID, once the server has answered
  let detail = null;         // the latest GET /api/models/<id>
  let fetchedAt = 0;         // when it came (ms), to count the TTL down between fetches
  let busy = null;           // 'loading' | 'unloading' while our own request runs
  let alive = true;
  let statesSeen = '';       // every model's state as last seen: a change asks for a new plan
  let detailSeq = 0;         // answers that come back out of order are dropped
  const cleanups = [];

  // Frame #################################################################################

  const title = h('h1', { 'data-testid': 'model-page-title' }, asked);
  const subtitle = h('div', { class: 'muted mp-subtitle' });
  const badge = h('span', { class: 'badge', 'data-testid': 'model-page-state' }, '…');
  const loadButton = h('button', { type: 'button', class: 'primary', 'data-testid': 'model-page-load', disabled: true,
    onclick: loadModel }, 'Load');
  const unloadButton = h('button', { type: 'button', 'data-testid': 'model-page-unload', disabled: true,
    onclick: unloadModel }, 'Unload');
  const logsLink = h('a', { class: 'button', href: '/ui/logs' }, 'Logs');
  const playLink = h('a', { class: 'button', href: '/ui/playground' }, 'Playground');
  const reason = h('p', { class: 'mp-reason', 'data-testid': 'model-page-reason', hidden: true });
  const tags = h('div', { class: 'mp-tags' });
  const fill = h('span', { class: 'load-fill' });
  const bar = h('div', { class: 'load-bar', role: 'progressbar', 'aria-label': 'Loading', 'aria-valuemin': 0,
    'aria-valuemax': 100 }, fill);
  const progressText = h('div', { 'data-testid': 'model-page-loading-text' });
  const progress = h('div', { class: 'mp-progress', 'data-testid': 'model-page-loading', hidden: true }, bar, progressText);
  const failureText = h('pre', { class: 'tail failure mp-failure-text' });
  const failureAt = h('div', { class: 'muted' });
  const failure = h('div', { class: 'mp-failure', role: 'alert', 'data-testid': 'model-page-failure', hidden: true },
    h('strong', {}, 'Its last start failed'), failureAt, failureText);
  const counts = h('div', { class: 'mp-counts', 'data-testid': 'model-page-counts' });
  const error = h('p', { class: 'error-text', 'data-testid': 'model-page-error', hidden: true });

  const planBox = h('div', { 'data-testid': 'model-page-plan' }, h('p', { class: 'muted' }, 'Loading…'));
  const loadsBox = h('div', { 'data-testid': 'model-page-loads' });
  const vramBox = h('div', { 'data-testid': 'model-page-vram' });
  const aboutBox = h('div', { 'data-testid': 'model-page-about' });
  const swapsBox = h('div', { 'data-testid': 'model-page-swaps' });
  const activityBox = h('div', { 'data-testid': 'model-page-activity' });
  const activityNote = h('p', { class: 'muted mp-note' });
  const settingsBox = h('div', { class: 'mp-settings-box', 'data-testid': 'model-page-settings' });

  const logBox = h('div', { class: 'log-output mp-log', 'data-testid': 'model-page-log', role: 'log', tabindex: '0',
    'aria-label': 'The model\'s output' });
  const followBox = h('input', { type: 'checkbox', checked: true, 'data-testid': 'model-page-log-follow' });
  const clearButton = h('button', { type: 'button', class: 'small', onclick: clearLog }, 'Clear view');

  const content = h('div', { class: 'mp', hidden: true },
    h('div', { class: 'mp-head' },
      h('div', { class: 'mp-name' }, title, subtitle),
      h('div', { class: 'mp-state' }, badge, progress),
      h('div', { class: 'actions mp-actions' }, loadButton, unloadButton, logsLink, playLink)),
    reason,
    failure,
    tags,
    counts,
    h('div', { class: 'mp-grid' },
      panel('What a request would do now', planBox),
      panel('Load and wake times', loadsBox),
      panel('Memory measured', vramBox),
      panel('Names, group and TTL', aboutBox)),
    h('section', { class: 'mp-section' },
      h('div', { class: 'mp-section-head' },
        h('h2', {}, 'Live output'),
        h('label', { class: 'inline-field' }, followBox, 'Follow'),
        clearButton),
      logBox),
    h('section', { class: 'mp-section' }, h('h2', {}, 'Swaps'),
      h('p', { class: 'muted mp-note' }, 'What started, woke, stopped or put it to sleep, newest first, and why.'),
      swapsBox),
    h('section', { class: 'mp-section' }, h('h2', {}, 'Recent requests'), activityNote, activityBox),
    h('section', { class: 'mp-section' }, h('h2', {}, 'Settings as loaded'),
      h('p', { class: 'muted mp-note' }, 'Macros expanded, defaults filled in; values that look secret are masked.'),
      h('div', { class: 'panel' }, settingsBox)));
  const waiting = h('p', { class: 'muted', 'data-testid': 'model-page-waiting' }, 'Loading…');

  root.append(
    h('p', { class: 'mp-back' }, h('a', { href: '/ui/models' }, '← Models')),
    error,
    waiting,
    content);

  // The detail ############################################################################

  async function refresh() {
    const seq = ++detailSeq;
    let body;
    try {
      body = await getJSON(`/api/models/${modelPath(id || asked)}`);
    } catch (err) {
      if (!alive || seq !== detailSeq) return;
      if (err.status === 404) { notFound(err.message); return; }
      error.textContent = `Could not load ${id || asked}: ${err.message}`;
      error.hidden = false;
      waiting.hidden = true;
      return;
    }
    if (!alive || seq !== detailSeq) return;
    error.hidden = true;
    const first = id === null;
    detail = body;
    id = body.id;
    fetchedAt = Date.now();
    statesSeen = statesOf(live.models);
    if (first) begin();
    render();
  }
  const refreshSoon = coalesce(refresh, 300);

  // Once the server has said which model this is: its log, its requests, its links.
  function begin() {
    waiting.hidden = true;
    content.hidden = false;
    document.title = `${id} · llama-swap`;
    logsLink.href = `/ui/logs?source=${encodeURIComponent(id)}`;
    playLink.href = `/ui/playground?model=${encodeURIComponent(id)}`;
    startLog(true);
    refreshActivity();
  }

  function notFound(message) {
    stopAll();
    document.title = 'No such model · llama-swap';
    replace(root, h('div', { class: 'mp-missing', 'data-testid': 'model-page-missing' },
      h('h1', {}, 'No such model'),
      h('p', {}, asked ? `llama-swap has no model (or alias) named "${asked}".` : 'No model ID in the address.'),
      message ? h('p', { class: 'muted' }, `The server said: ${message}`) : null,
      h('p', {}, h('a', { href: '/ui/models', 'data-testid': 'model-page-back' }, 'Go to the models'))));
  }

  // The model's status from the event stream, fresher than the last fetch.
  function liveStatus() {
    return (live.models || []).find((m) => m.id === id && !m.peerID) || null;
  }

  // A section is built again only when what it shows has changed, so a fetch every few
  // seconds does not take away a selection in it or a link's focus.
  const shownAs = new Map();
  function renderIfChanged(name, data, fn) {
    const signature = JSON.stringify(data);
    if (shownAs.get(name) === signature) return;
    shownAs.set(name, signature);
    fn();
  }

  function render() {
    renderHead();
    renderIfChanged('plan', detail.plan, renderPlan);
    renderIfChanged('loads', [detail.learnt?.load_times, detail.learnt?.wake_times, Boolean(detail.settings?.sleep)],
      renderLoads);
    renderIfChanged('vram', [detail.learnt?.vram, detail.learnt?.vram_asleep, detail.settings?.vram], renderVram);
    renderIfChanged('about', [detail.id, detail.aliases, detail.group, detail.matrix_sets, detail.settings?.ttl,
      detail.ttl_remaining === null || detail.ttl_remaining === undefined], renderAbout);
    renderIfChanged('swaps', [id, detail.swaps], renderSwaps);
    renderIfChanged('settings', detail.settings, renderSettings);
  }

  // Header ################################################################################

  function renderHead() {
    if (!detail) return;
    const status = liveStatus();
    const state = status?.state || detail.state;
    const failed = state === 'stopped' ? (status ? status.failed : detail.failed) || null : null;
    const shown = failed ? 'failed' : state || 'stopped';

    title.textContent = detail.name || detail.id;
    subtitle.textContent = detail.name ? detail.id : '';
    subtitle.hidden = !detail.name;
    badge.textContent = shown;
    badge.className = `badge state-${shown}`;

    // The reason was true of the fetched state; a newer state waits for the next fetch.
    const why = state === detail.state && !failed ? detail.state_reason : '';
    reason.textContent = why ? `${REASON_LABELS[state] || 'Why'}: ${why}` : '';
    reason.hidden = !why;

    failure.hidden = !failed;
    if (failed) {
      failureText.replaceChildren(renderAnsi(failed.error || ''));
      failureAt.textContent = failed.at ? `at ${fmtTime(failed.at)} · it stays failed until the next attempt` : '';
    }

    showProgress(state === 'starting' ? (status?.loading || detail.loading) : null);

    loadButton.disabled = Boolean(busy) || ['ready', 'starting', 'waking'].includes(state);
    loadButton.textContent = busy === 'loading' ? (state === 'sleeping' || state === 'waking' ? 'Waking…' : 'Loading…')
      : state === 'sleeping' ? 'Wake' : 'Load';
    unloadButton.disabled = Boolean(busy) || state === 'stopped' || !state;
    unloadButton.textContent = busy === 'unloading' ? 'Unloading…' : 'Unload';

    replace(tags,
      detail.description ? h('p', { class: 'model-desc mp-desc' }, detail.description) : null,
      Object.entries(detail.capabilities || {}).filter(([, yes]) => yes)
        .map(([name]) => h('span', { class: 'tag' }, name.replace(/_/g, ' '))),
      detail.context_length ? h('span', { class: 'tag' }, `ctx ${detail.context_length.toLocaleString()}`) : null,
      detail.settings?.protected ? h('span', { class: 'tag', title: 'requests never stop it' }, 'protected') : null,
      detail.settings?.unlisted ? h('span', { class: 'tag', title: 'left out of /v1/models' }, 'unlisted') : null,
      asked && asked !== detail.id && (detail.aliases || []).includes(asked)
        ? h('span', { class: 'tag' }, `opened by its alias ${asked}`) : null);

    renderCounts(state);
  }

  function renderCounts(state) {
    if (!detail) return;
    const ttl = detail.settings?.ttl;
    replace(counts,
      h('span', {}, h('span', { class: 'muted' }, 'In flight '), String(detail.in_flight ?? 0)),
      h('span', {}, h('span', { class: 'muted' }, 'Queued '), String(detail.queued ?? 0)),
      h('span', { 'data-testid': 'model-page-ttl' }, h('span', { class: 'muted' }, 'TTL '), ttlText(state, ttl)));
  }

  function ttlText(state, ttl) {
    if (!ttl || ttl <= 0) return 'none (stays loaded)';
    const base = fmtSeconds(ttl);
    if (state !== 'ready') return base;
    const remaining = detail.ttl_remaining;
    if (remaining === null || remaining === undefined) {
      return detail.in_flight > 0 ? `${base} · busy, counts from its last request` : base;
    }
    return `${base} · unloads in ${fmtSeconds(remaining - (Date.now() - fetchedAt) / 1000)}`;
  }

  function showProgress(loading) {
    progress.hidden = !loading;
    if (!loading) { fill.style.width = ''; return; }
    const known = typeof loading.progress === 'number';
    const percent = known ? Math.round(loading.progress * 100) : null;
    const time = typeof loading.eta_s === 'number' ? `~${fmtSeconds(loading.eta_s)} left`
      : `${fmtSeconds(loading.elapsed_s || 0)} so far`;
    progressText.textContent = `loading${known ? ` ${percent}%` : ''} · ${time}`;
    bar.classList.toggle('indeterminate', !known);
    fill.style.width = known ? `${percent}%` : '';
    if (known) bar.setAttribute('aria-valuenow', percent);
    else bar.removeAttribute('aria-valuenow');
    bar.setAttribute('aria-valuetext', progressText.textContent);
  }

  // Actions ###############################################################################

  async function loadModel() {
    const target = id;
    const failedBefore = detail?.failed?.at;
    busy = 'loading';
    renderHead();
    try {
      await postJSON(`/api/models/load/${modelPath(target)}`);
    } catch (err) {
      // A start that failed shows in the failure box; other refusals (403, 503...) as a toast.
      if (alive) await refresh();
      const failedNow = detail?.state === 'stopped' && detail.failed && detail.failed.at !== failedBefore;
      if (alive && !failedNow) toast(`Could not load ${target}: ${err.message}`);
    } finally {
      busy = null;
      if (alive) { renderHead(); refreshSoon(); }
    }
  }

  async function unloadModel() {
    const target = id;
    busy = 'unloading';
    renderHead();
    try {
      await request(`/api/models/unload/${modelPath(target)}`, { method: 'POST' });
    } catch (err) {
      if (alive) toast(`Could not unload ${target}: ${err.message}`);
    } finally {
      busy = null;
      if (alive) { renderHead(); refreshSoon(); }
    }
  }

  // Plan ##################################################################################

  function renderPlan() {
    const plan = detail.plan || {};
    const stops = plan.stops || [];
    const wait = typeof plan.expected_wait_s === 'number' && plan.action !== 'serve'
      ? `Expected wait: about ${fmtSeconds(plan.expected_wait_s)}.` : null;
    const headline = {
      serve: 'Serve it at once: the model is ready.',
      join: 'Wait for the start already under way.',
      start: stops.length ? 'Start it, after making room:' : 'Start it, beside whatever runs.',
      wake: stops.length ? 'Wake it, after making room:' : 'Wake it from its sleep.',
      swap: 'Swap: start it, after making room:',
      queue: `Queue${plan.queue_position ? ` at position ${plan.queue_position}` : ''}.`,
      refuse: 'Refuse it.',
    }[plan.action] || `${plan.action || 'unknown'}.`;
    replace(planBox,
      h('p', { class: `mp-plan-action plan-${plan.action || 'unknown'}`, 'data-testid': 'model-page-plan-action' }, headline),
      plan.reason ? h('p', { class: 'mp-plan-reason' }, `Because ${plan.reason}`) : null,
      stops.length ? h('ul', { class: 'mp-list' }, stops.map((stop) =>
        h('li', {}, `${stop.action === 'sleep' ? 'puts' : 'stops'} `, h('span', { class: 'model-id' }, stop.model),
          stop.action === 'sleep' ? ' to sleep' : '', stop.why ? ` because ${stop.why}` : ''))) : null,
      wait ? h('p', { class: 'muted' }, wait) : null,
      h('p', { class: 'muted mp-note' }, 'As the scheduler decides it now, for a request without an API key; nothing is done.'));
  }

  // Learnt: load and wake times, memory ###################################################

  function renderLoads() {
    const learnt = detail.learnt || {};
    const loads = learnt.load_times || [];
    const wakes = learnt.wake_times || [];
    replace(loadsBox,
      h('dl', { class: 'facts' },
        h('dt', {}, 'Usual load'),
        h('dd', { 'data-testid': 'model-page-usual-load' }, typeof learnt.usual_load_s === 'number'
          ? `${fmtDuration(learnt.usual_load_s)} (the median of ${loads.length})` : h('span', { class: 'muted' }, 'not measured yet')),
        h('dt', {}, 'Loads'),
        h('dd', { 'data-testid': 'model-page-load-times' }, times(loads)),
        detail.settings?.sleep || wakes.length ? [
          h('dt', {}, 'Wakes'),
          h('dd', { 'data-testid': 'model-page-wake-times' }, times(wakes)),
        ] : null),
      h('p', { class: 'muted mp-note' }, 'As measured, oldest first.'));
  }

  function times(list) {
    return list.length ? list.map((t) => h('span', { class: 'tag mono' }, fmtDuration(t)))
      : h('span', { class: 'muted' }, 'none yet');
  }

  function renderVram() {
    const learnt = detail.learnt || {};
    const held = Object.entries(learnt.vram || {});
    const asleep = Object.entries(learnt.vram_asleep || {});
    const hint = Object.entries(detail.settings?.vram || {});
    const gpuRows = (entries) => entries.sort(([a], [b]) => a.localeCompare(b, undefined, { numeric: true }))
      .map(([gpu, bytes]) => [h('dt', {}, gpu === 'all' ? 'all GPUs' : `GPU ${gpu}`), h('dd', {}, fmtBytes(bytes))]);
    replace(vramBox,
      held.length ? [h('h3', {}, 'While it runs'), h('dl', { class: 'facts' }, gpuRows(held))]
        : h('p', { class: 'muted' }, 'Not measured: the vram router measures what its server holds once it is ready.'),
      asleep.length ? [h('h3', {}, 'Kept while asleep'), h('dl', { class: 'facts' }, gpuRows(asleep))] : null,
      hint.length ? [h('h3', {}, 'As configured (vram)'), h('dl', { class: 'facts' }, gpuRows(hint))] : null);
  }

  // Names, group or matrix sets, TTL.
  function renderAbout() {
    const group = detail.group;
    const sets = detail.matrix_sets;
    replace(aboutBox, h('dl', { class: 'facts' },
      h('dt', {}, 'ID'), h('dd', {}, h('span', { class: 'mono' }, detail.id)),
      h('dt', {}, 'Aliases'),
      h('dd', { 'data-testid': 'model-page-aliases' }, (detail.aliases || []).length
        ? detail.aliases.map((alias) => h('span', { class: 'tag mono' }, alias)) : h('span', { class: 'muted' }, 'none')),
      group ? [
        h('dt', {}, 'Group'),
        h('dd', { 'data-testid': 'model-page-group' }, h('span', { class: 'mono' }, group.name), ' · ',
          [group.swap ? 'one member at a time' : 'members run together',
            group.exclusive ? 'stops other groups' : 'runs beside other groups',
            group.persistent ? 'never stopped by other groups' : ''].filter(Boolean).join('; ')),
      ] : null,
      sets ? [
        h('dt', {}, 'Matrix sets'),
        h('dd', { 'data-testid': 'model-page-sets' }, sets.length ? sets.map((s) => h('span', { class: 'tag mono' }, s))
          : h('span', { class: 'muted' }, 'in none: it runs alone')),
      ] : null,
      h('dt', {}, 'TTL'),
      h('dd', {}, detail.settings?.ttl > 0 ? `${fmtSeconds(detail.settings.ttl)} without requests, then unloaded`
        : 'none: stays loaded until something stops it'),
      h('dt', {}, 'TTL left'),
      h('dd', { 'data-testid': 'model-page-ttl-left' }, ttlLeft())));
  }

  function ttlLeft() {
    const remaining = detail.ttl_remaining;
    if (remaining === null || remaining === undefined) return h('span', { class: 'muted' }, '—');
    return fmtSeconds(remaining - (Date.now() - fetchedAt) / 1000);
  }

  // Swaps #################################################################################

  function renderSwaps() {
    const records = [...(detail.swaps || [])].reverse();
    if (!records.length) {
      replace(swapsBox, h('p', { class: 'empty' }, 'No swaps involving this model yet.'));
      return;
    }
    replace(swapsBox, h('div', { class: 'table-wrap' }, h('table', { class: 'stack mp-swaps' },
      h('thead', {}, h('tr', {},
        h('th', {}, 'Time'), h('th', {}, 'What'), h('th', {}, 'Why'), h('th', {}, 'Caused by'),
        h('th', { class: 'num' }, 'Swap took'), h('th', {}, 'Result'))),
      h('tbody', {}, records.map(swapRow)))));
  }

  function swapRow(record) {
    const mine = record.model === id;
    const stop = (record.stops || []).find((s) => s.model === id);
    let what;
    let why;
    if (mine) {
      what = record.action === 'wake' ? 'woken' : 'started';
      const others = (record.stops || []).filter((s) => s.model !== id);
      why = others.length ? others.map((s) => h('div', {}, `${s.action === 'sleep' ? 'put' : 'stopped'} `,
        h('span', { class: 'model-id' }, s.model), s.action === 'sleep' ? ' to sleep' : '', s.why ? `: ${s.why}` : ''))
        : h('span', { class: 'muted' }, 'nothing stopped for it');
    } else {
      what = stop?.action === 'sleep' ? 'put to sleep' : 'stopped';
      why = h('div', {}, stop?.why || KIND_WORDS[record.kind] || record.kind,
        record.model ? [' · for ', h('span', { class: 'model-id' }, record.model)] : null);
    }
    const by = [record.key ? h('span', { class: 'tag' }, `key ${record.key}`) : null,
      record.request ? h('span', { class: 'mono' }, record.request) : null].filter(Boolean);
    const result = record.result || 'pending';
    const resultClass = result === 'ok' ? 'mp-ok' : result.startsWith('failed') ? 'status-error' : 'muted';
    const took = record.duration_s !== null && record.duration_s !== undefined ? fmtSeconds(record.duration_s)
      : record.expected_s ? `~${fmtSeconds(record.expected_s)} expected` : '—';
    return h('tr', { 'data-testid': `model-page-swap-${record.id}` },
      h('td', { 'data-label': 'Time', class: 'mp-nowrap' }, fmtTime(record.time)),
      h('td', { 'data-label': 'What' }, h('strong', {}, what), record.kind && record.kind !== 'swap'
        ? h('span', { class: 'muted' }, ` (${record.kind})`) : null),
      h('td', { 'data-label': 'Why', class: 'mp-wrap' }, why),
      h('td', { 'data-label': 'Caused by', class: 'mp-wrap' }, by.length ? by : h('span', { class: 'muted' }, '—')),
      h('td', { 'data-label': 'Swap took', class: 'num' }, took),
      h('td', { 'data-label': 'Result', class: `mp-wrap ${resultClass}` }, h('span', { class: 'mp-result' }, result)));
  }

  // Settings ##############################################################################

  function renderSettings() {
    const s = detail.settings || {};
    const env = s.env || [];
    const filters = s.filters || {};
    const setParams = Object.keys(filters.setParams || {}).length ? json(filters.setParams) : null;
    const value = (v) => (v === null || v === undefined || v === '' ? h('span', { class: 'muted' }, 'none')
      : typeof v === 'boolean' ? (v ? 'yes' : 'no') : String(v));
    replace(settingsBox,
      h('h3', {}, 'Command (cmd)'),
      h('pre', { class: 'body mp-cmd', 'data-testid': 'model-page-cmd' }, s.cmd || ''),
      s.cmdStop ? [h('h3', {}, 'Stop command (cmdStop)'), h('pre', { class: 'body mp-cmd' }, s.cmdStop)] : null,
      h('h3', {}, 'Environment (env)'),
      env.length ? h('ul', { class: 'mp-env', 'data-testid': 'model-page-env' }, env.map((item) => h('li', { class: 'mono' }, item)))
        : h('p', { class: 'muted', 'data-testid': 'model-page-env' }, 'none'),
      h('h3', {}, 'The rest'),
      h('dl', { class: 'facts mp-settings' },
        [
          ['proxy', value(s.proxy)],
          ['checkEndpoint', value(s.checkEndpoint)],
          ['ttl', s.ttl > 0 ? `${s.ttl} s` : '0 (none)'],
          ['unloadTimeout', typeof s.unloadTimeout === 'number' ? `${s.unloadTimeout} s` : value(s.unloadTimeout)],
          ['concurrencyLimit', value(s.concurrencyLimit)],
          ['useModelName', value(s.useModelName)],
          ['sendLoadingState', value(s.sendLoadingState)],
          ['unlisted', value(s.unlisted)],
          ['protected', value(s.protected)],
          ['filters.stripParams', (filters.stripParams || []).length
            ? filters.stripParams.map((p) => h('span', { class: 'tag mono' }, p)) : value(null)],
          ['filters.setParams', setParams ? h('pre', { class: 'body' }, setParams) : value(null)],
          ['kvCache', s.kvCache ? `maxDiskMB ${s.kvCache.maxDiskMB}, saveTimeout ${s.kvCache.saveTimeout} s` : value(null)],
          ['sleep', s.sleep ? h('div', {}, h('div', { class: 'mono' }, `sleep: ${s.sleep.sleep}`),
            h('div', { class: 'mono' }, `wake: ${s.sleep.wake}`)) : value(null)],
          ['vram', Object.keys(s.vram || {}).length
            ? Object.entries(s.vram).map(([gpu, bytes]) => h('span', { class: 'tag' }, `${gpu === 'all' ? 'all GPUs' : `GPU ${gpu}`}: ${fmtBytes(bytes)}`))
            : value(null)],
          ['metadata', s.metadata && Object.keys(s.metadata).length ? h('pre', { class: 'body' }, json(s.metadata)) : value(null)],
        ].map(([name, shown]) => [h('dt', { class: 'mono' }, name), h('dd', {}, shown)])));
  }

  // Live output ###########################################################################

  let logController = null;
  let logRetry = null;
  let logLost = false;
  let ansi = new AnsiState();
  let logEmpty = true;

  function startLog(withHistory) {
    stopLog();
    const current = new AbortController();
    logController = current;
    if (logEmpty && !logBox.childElementCount) logBox.append(lineElement('no output yet', true));
    const lines = [];
    const split = lineSplitter((line) => lines.push(line));
    const feed = (chunk) => { split(chunk); showLines(lines.splice(0)); };
    const onOpen = () => {
      if (logLost) note('— reconnected —');
      logLost = false;
    };
    streamText(`/logs/stream/${modelPath(id)}${withHistory ? '' : '?no-history'}`,
      { signal: current.signal, onText: feed, onOpen })
      .then(() => {
        split.flush();
        showLines(lines.splice(0));
        if (current.signal.aborted) return;
        note('— the stream ended (server restarting?); reconnecting —');
        logLost = true;
        logRetry = setTimeout(() => startLog(false), LOG_RETRY_MS);
      })
      .catch((err) => {
        if (current.signal.aborted || !alive) return;
        if (!logLost) note(`— cannot read the output: ${err.message} —`);
        if (err.status >= 400 && err.status < 500) return;  // refused: retrying will not help
        logLost = true;
        logRetry = setTimeout(() => startLog(false), LOG_RETRY_MS);
      });
  }

  function stopLog() {
    clearTimeout(logRetry);
    logRetry = null;
    if (logController) logController.abort();
    logController = null;
  }

  function lineElement(text, isNote = false) {
    const element = h('div', { class: isNote ? 'log-line log-note' : 'log-line' });
    element.append(isNote ? text : renderAnsi(text, ansi));
    return element;
  }

  function showLines(lines) {
    if (!lines.length || !alive) return;
    if (logEmpty) { logBox.replaceChildren(); logEmpty = false; }
    append(lines.map((line) => lineElement(line)));
  }

  function note(text) {
    if (logEmpty) { logBox.replaceChildren(); logEmpty = false; }
    append([lineElement(text, true)]);
  }

  function append(elements) {
    logBox.append(...elements);
    let excess = logBox.childElementCount - LOG_LINES;
    while (excess-- > 0) logBox.firstElementChild.remove();
    if (followBox.checked) logBox.scrollTop = logBox.scrollHeight;
  }

  function clearLog() {
    logBox.replaceChildren();
    ansi = new AnsiState();
  }

  logBox.addEventListener('scroll', () => {
    followBox.checked = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 30;
  });
  followBox.addEventListener('change', () => {
    if (followBox.checked) logBox.scrollTop = logBox.scrollHeight;
  });

  // Recent requests #######################################################################

  let activitySeq = 0;
  let activityShown = null;  // the rows on show, as JSON

  async function refreshActivity() {
    if (id === null) return;
    const seq = ++activitySeq;
    let body;
    let stats = null;
    try {
      [body, stats] = await Promise.all([
        getJSON(`/api/metrics/activity?${new URLSearchParams({ model: id, limit: ACTIVITY_ROWS })}`),
        getJSON(`/api/metrics/stats?${new URLSearchParams({ model: id })}`).catch(() => null),
      ]);
    } catch (err) {
      if (!alive || seq !== activitySeq) return;
      activityNote.textContent = `Could not load its requests: ${err.message}`;
      return;
    }
    if (!alive || seq !== activitySeq) return;
    const rows = body.data || [];
    activityNote.replaceChildren(...(body.total
      ? [`${body.total.toLocaleString()} recorded`, stats ? speeds(stats) : '',
        rows.length < body.total ? ` · the latest ${rows.length} below · ` : ' · ',
        h('a', { href: '/ui/activity' }, 'all activity')]
      : ['No requests recorded for it yet.']));
    const signature = JSON.stringify(rows);
    if (signature === activityShown) return;
    activityShown = signature;
    if (!rows.length) { activityBox.replaceChildren(); return; }
    replace(activityBox, h('div', { class: 'table-wrap' }, h('table', { class: 'stack mp-activity' },
      h('thead', {}, h('tr', {},
        h('th', {}, 'Time'), h('th', {}, 'Path'), h('th', { class: 'num' }, 'Status'),
        h('th', { class: 'num' }, 'In'), h('th', { class: 'num' }, 'Out'), h('th', { class: 'num' }, 'Prompt t/s'),
        h('th', { class: 'num' }, 'Gen t/s'), h('th', { class: 'num' }, 'Duration'), h('th', {}, 'Capture'))),
      h('tbody', {}, rows.map(activityRow)))));
  }
  const refreshActivitySoon = coalesce(refreshActivity, 700);

  function speeds(stats) {
    const p = (hist) => (hist ? `${fmtSpeed(hist.p50)} / ${fmtSpeed(hist.p95)}` : null);
    const prompt = p(stats.prompt_histogram);
    const gen = p(stats.gen_histogram);
    return [prompt ? ` · prompt t/s p50/p95 ${prompt}` : '', gen ? ` · gen t/s p50/p95 ${gen}` : ''].join('');
  }

  function activityRow(row) {
    const t = row.tokens || {};
    const failed = row.resp_status_code >= 400;
    return h('tr', { 'data-testid': `model-page-activity-${row.id}`, title: row.error_msg || null },
      h('td', { 'data-label': 'Time', class: 'mp-nowrap' }, fmtTime(row.timestamp)),
      h('td', { 'data-label': 'Path', class: 'mp-wrap' }, h('span', { class: 'mono' }, row.req_path),
        row.key ? h('span', { class: 'tag' }, row.key) : null),
      h('td', { 'data-label': 'Status', class: failed ? 'num status-error' : 'num' }, String(row.resp_status_code),
        row.error_msg ? h('div', { class: 'muted mp-wrap' }, row.error_msg) : null),
      h('td', { 'data-label': 'In', class: 'num' }, fmtCount(t.input_tokens)),
      h('td', { 'data-label': 'Out', class: 'num' }, fmtCount(t.output_tokens)),
      h('td', { 'data-label': 'Prompt t/s', class: 'num' }, fmtSpeed(t.prompt_per_second)),
      h('td', { 'data-label': 'Gen t/s', class: 'num' }, fmtSpeed(t.tokens_per_second)),
      h('td', { 'data-label': 'Duration', class: 'num' }, fmtMs(row.duration_ms)),
      h('td', { 'data-label': 'Capture' }, row.has_capture
        ? h('a', { href: `/ui/captures/${row.id}`, 'data-testid': `model-page-capture-${row.id}` }, `#${row.id}`)
        : h('span', { class: 'muted' }, '—')));
  }

  // Wiring ################################################################################

  function onModelStatus(models) {
    if (!detail) return;
    renderHead();
    const states = statesOf(models);
    if (states !== statesSeen) {
      statesSeen = states;
      refreshSoon();
    }
  }

  function onReconnected() {
    refresh();
    refreshActivity();
    if (id !== null && logLost) startLog(false);
  }

  cleanups.push(
    on('modelStatus', onModelStatus),
    on('swap', (record) => {
      if (!record || record.model === id || (record.stops || []).some((s) => s.model === id)) refreshSoon();
    }),
    on('activity', refreshActivitySoon),
    on('reconnected', onReconnected),
  );
  const poll = setInterval(() => {
    refresh();
    refreshActivity();
  }, POLL_MS);
  const tick = setInterval(() => {
    if (!detail) return;
    const state = liveStatus()?.state || detail.state;
    renderCounts(state);
    const left = aboutBox.querySelector('[data-testid="model-page-ttl-left"]');
    if (left) replace(left, ttlLeft());
  }, 1000);

  function stopAll() {
    alive = false;
    cleanups.splice(0).forEach((off) => off());
    clearInterval(poll);
    clearInterval(tick);
    refreshSoon.cancel();
    refreshActivitySoon.cancel();
    stopLog();
  }

  if (!asked) notFound('');
  else refresh();

  return stopAll;
}

const REASON_LABELS = { sleeping: 'Asleep', stopping: 'Stopping', stopped: 'Stopped' };

const KIND_WORDS = {
  ttl: 'its TTL ran out',
  unload: 'unloaded on request',
  reload: 'the config was reloaded',
};

// "a:ready,b:stopped": whether any model's state changed since the last fetch.
function statesOf(models) {
  return (models || []).map((m) => `${m.id}:${m.state}`).join(',');
}

// Under a second in milliseconds (a wake may take 12 ms), else as fmtSeconds writes it.
function fmtDuration(seconds) {
  return typeof seconds === 'number' && seconds < 1 ? fmtMs(seconds * 1000) : fmtSeconds(seconds);
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

function panel(heading, ...children) {
  return h('section', { class: 'panel mp-panel' }, h('h2', {}, heading), children);
}
