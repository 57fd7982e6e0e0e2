// Models page: every model with its live state, what it is serving and when its TTL unloads
// it; load / unload / unload all; peers, aliases, selectors and profiles; how far a starting
// model has got and the last lines of its output; and the requests in flight, each with a
// cancel button.
//
// Under each model: why it last started, stopped or went to sleep (GET /api/swaps, then swap
// events), and, when the pointer or focus reaches its Load button, what loading it would cost
// (GET /api/plan: the models it would stop and why, the expected wait) as the button's tooltip:
// nothing on the page moves under a pointer on its way to click.
//
// States come from modelStatus events; so does a starting model's `loading` (seconds so far,
// progress 0..1 or null, ETA in seconds or null), sent again every second while it starts.
// In-flight and queued counts and the TTL come from GET /running, fetched again whenever
// states or in-flight requests change (and every few seconds as a fallback); the TTL then
// counts down locally between fetches.

import { getJSON, request, postJSON, on, live, modelPath, streamText, lineSplitter } from '/ui/api.js';
import { h, replace, field, toast, fmtSeconds, fmtBytes, fmtClock, coalesce } from '/ui/dom.js';
import { renderAnsi } from '/ui/ansi.js';

const TAIL_LINES = 8;
// Browsers open at most six HTTP/1.1 connections to one server, and a load request holds one
// until the model is ready: follow the output of at most two starting models at a time.
const MAX_TAILS = 2;
const RUNNING_POLL_MS = 5000;
const SYSTEM_POLL_MS = 10000;

export function mount(root) {
  let alive = true;
  const cleanups = [];

  // Model table rows by ID, created once and updated in place so that buttons keep focus.
  const rows = new Map();
  const running = new Map();      // id -> /running entry plus fetchedAt (ms)
  const busy = new Map();         // id -> 'loading' | 'unloading'
  const tails = new Map();        // id -> {controller, lines} while the model starts
  const lastState = new Map();    // id -> state seen by this page (to spot fresh starts)
  const lastSwap = new Map();     // id -> the latest swap record that started or stopped it

  const modelBody = h('tbody');
  const modelTable = h('table', { class: 'stack' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'Model'), h('th', {}, 'State'), h('th', { class: 'num' }, 'In flight'),
      h('th', { class: 'num' }, 'Queued'), h('th', { class: 'num' }, 'TTL left'), h('th', {}, 'Actions'))),
    modelBody);
  const noModels = h('p', { class: 'empty' }, 'Waiting for the model list from the server…');
  const search = h('input', { type: 'search', placeholder: 'Find a model', 'aria-label': 'Find a model', 'data-testid': 'model-search' });
  const sortSelect = h('select', { 'aria-label': 'Order', 'data-testid': 'model-sort' },
    h('option', { value: 'config' }, 'as configured'), h('option', { value: 'name' }, 'by name'), h('option', { value: 'state' }, 'by state'));
  const noMatch = h('p', { class: 'empty', hidden: true }, 'No model matches.');
  search.addEventListener('input', applyFilter);
  sortSelect.addEventListener('change', () => renderModels(live.models));

  const unloadAllButton = h('button', { type: 'button', 'data-testid': 'unload-all', onclick: unloadAll }, 'Unload all');
  const profileBox = h('div', { class: 'inline-field', hidden: true });
  const systemStrip = h('div', { class: 'system-strip', hidden: true, 'aria-label': 'System' });
  const peersSection = h('section', { hidden: true });
  const virtualSection = h('section', { hidden: true });
  const inflightBody = h('tbody');
  const inflightEmpty = h('p', { class: 'empty' }, 'No requests in flight.');
  const inflightTable = h('table', { class: 'stack', 'data-testid': 'inflight-table' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'ID'), h('th', {}, 'Model'), h('th', {}, 'Request'), h('th', {}, 'Client'),
      h('th', {}, 'Status'), h('th', { class: 'num' }, 'Elapsed'), h('th', { class: 'num' }, 'Sent'), h('th', {}, ''))),
    inflightBody);

  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Models'), profileBox, unloadAllButton),
    systemStrip,
    h('div', { class: 'toolbar' }, search, sortSelect),
    h('div', { class: 'table-wrap' }, modelTable),
    noModels,
    noMatch,
    peersSection,
    virtualSection,
    h('h2', {}, 'In-flight requests'),
    h('div', { class: 'table-wrap' }, inflightTable),
    inflightEmpty,
  );

  // Local models ###########################################################################

  // `models` is null until the event stream has sent the first list.
  function renderModels(models) {
    if (!models) return;
    const local = sortedModels(models.filter((m) => !m.peerID));
    noModels.hidden = local.length > 0;
    noModels.textContent = 'No local models configured.';
    const seen = new Set();
    for (const model of local) {
      seen.add(model.id);
      let row = rows.get(model.id);
      if (!row) {
        row = createRow(model.id);
        rows.set(model.id, row);
      }
      modelBody.append(row.tr, row.tailTr);  // (re)appending keeps the server's order
      describe(row, model);
      showSwap(model.id);
      if (lastState.get(model.id) !== model.state) row.load.removeAttribute('title');  // what it said no longer holds
      updateRow(model.id, model.state);
      showLoad(row, model.state === 'starting' ? model.loading : null);
      followStart(model.id, model.state);
      lastState.set(model.id, model.state);
    }
    for (const [id, row] of rows) {
      if (seen.has(id)) continue;
      row.tr.remove();
      row.tailTr.remove();
      rows.delete(id);
      stopTail(id);
    }
    applyFilter();
    renderPeers(models.filter((m) => m.peerID));
  }

  function createRow(id) {
    const info = h('div');
    const state = h('span', { class: 'badge', 'data-testid': `model-state-${id}` });
    const inFlight = h('td', { class: 'num', 'data-label': 'In flight' });
    const queued = h('td', { class: 'num', 'data-label': 'Queued' });
    const ttl = h('td', { class: 'num', 'data-label': 'TTL left' });
    const load = h('button', { type: 'button', class: 'small primary', 'data-testid': `load-${id}`, onclick: () => loadModel(id) }, 'Load');
    const failure = h('pre', { class: 'tail failure', 'data-testid': `model-failure-${id}`, hidden: true });
    const swapNote = h('div', { class: 'muted swap-note', 'data-testid': `model-swap-${id}`, hidden: true });
    for (const kind of ['pointerenter', 'focus']) load.addEventListener(kind, () => showPlan(id));
    const unload = h('button', { type: 'button', class: 'small', 'data-testid': `unload-${id}`, onclick: () => unloadModel(id) }, 'Unload');
    const logs = h('a', { href: `/ui/logs?source=${encodeURIComponent(id)}`, class: 'button small' }, 'Logs');
    const fill = h('span', { class: 'load-fill' });
    const bar = h('div', { class: 'load-bar', role: 'progressbar', 'aria-label': `Loading ${id}`, 'aria-valuemin': 0, 'aria-valuemax': 100 }, fill);
    const text = h('div', { 'data-testid': `model-load-text-${id}` });
    const progress = { box: h('div', { class: 'load-progress', 'data-testid': `model-load-${id}`, hidden: true }, bar, text), bar, fill, text };
    const tr = h('tr', { 'data-testid': `model-row-${id}` },
      h('td', { 'data-label': '' }, info, swapNote, failure),
      h('td', { 'data-label': 'State' }, h('div', { class: 'state-cell' }, state, progress.box)),
      inFlight, queued, ttl,
      h('td', { 'data-label': '' }, h('div', { class: 'actions' }, load, unload, logs)));
    const tail = h('pre', { class: 'tail', 'data-testid': `model-tail-${id}`, 'aria-live': 'off' });
    const tailTr = h('tr', { class: 'tail-row', hidden: true }, h('td', { colspan: 6, 'data-label': '' },
      h('div', { class: 'muted' }, `Starting ${id}: last lines of its output`), tail));
    return { tr, tailTr, tail, info, state, inFlight, queued, ttl, load, unload, progress, swapNote, failure };
  }

  function describe(row, model) {
    replace(row.info,
      h('div', { class: 'model-id' }, h('a', { href: `/ui/model/${modelPath(model.id)}`, 'data-testid': `model-link-${model.id}` }, model.id)),
      model.name ? h('div', {}, model.name) : null,
      model.description ? h('div', { class: 'model-desc' }, model.description) : null,
      h('div', {},
        (model.aliases || []).map((alias) => h('span', { class: 'tag', title: 'alias' }, `alias: ${alias}`)),
        Object.entries(model.capabilities || {}).filter(([, on]) => on)
          .map(([name]) => h('span', { class: 'tag' }, name.replace(/_/g, ' '))),
        model.context_length ? h('span', { class: 'tag' }, `ctx ${model.context_length.toLocaleString()}`) : null,
        model.unlisted ? h('span', { class: 'tag' }, 'unlisted') : null,
        model.protected ? h('span', { class: 'tag', title: 'requests never stop it', 'data-testid': `model-protected-${model.id}` }, 'protected') : null,
        model.group ? h('span', { class: 'tag', title: groupRules(model.group), 'data-testid': `model-group-${model.id}` }, `group: ${model.group.name}`) : null,
        (model.matrix_sets || []).length ? h('span', { class: 'tag', title: 'matrix sets that may run it', 'data-testid': `model-sets-${model.id}` }, `sets: ${model.matrix_sets.join(', ')}`)
          : model.matrix_sets ? h('span', { class: 'tag', title: 'in no matrix set: it runs alone' }, 'runs alone') : null));
  }

  function groupRules(group) {
    return [group.swap ? 'one member at a time' : 'members run together',
      group.exclusive ? 'stops other groups' : 'runs beside other groups',
      group.persistent ? 'never stopped by other groups' : ''].filter(Boolean).join('; ');
  }

  // Search and sort: with many models, find one by ID, name or alias; order by name or state.
  function applyFilter() {
    const words = search.value.trim().toLowerCase();
    const models = (live.models || []).filter((m) => !m.peerID);
    let shown = 0;
    for (const model of models) {
      const row = rows.get(model.id);
      if (!row) continue;
      const text = [model.id, model.name, model.description, ...(model.aliases || [])].join(' ').toLowerCase();
      const visible = !words || text.includes(words);
      row.tr.hidden = !visible;
      if (!visible) row.tailTr.hidden = true;
      shown += visible;
    }
    noMatch.hidden = !words || shown > 0;
  }

  function sortedModels(models) {
    const order = sortSelect.value;
    if (order === 'config') return models;
    const rank = { ready: 0, starting: 1, waking: 1, stopping: 2, sleeping: 3, stopped: 4 };
    return [...models].sort((a, b) => (order === 'state' ? (rank[a.state] ?? 5) - (rank[b.state] ?? 5) : 0)
      || a.id.localeCompare(b.id));
  }

  // Swaps: why each model last started or stopped, and what loading one would cost ###########

  function noteSwap(record) {
    if (record.model) lastSwap.set(record.model, record);
    for (const stop of record.stops || []) lastSwap.set(stop.model, record);
    for (const id of new Set([record.model, ...(record.stops || []).map((s) => s.model)])) showSwap(id);
  }

  function showSwap(id) {
    const row = rows.get(id);
    const record = lastSwap.get(id);
    if (!row || !record) return;
    const time = fmtClock(record.time);
    const stop = (record.stops || []).find((s) => s.model === id);
    const by = [record.key ? `key ${record.key}` : '', record.request].filter(Boolean).join(', ');
    row.swapNote.textContent = stop
      ? `${stop.action === 'sleep' ? 'put to sleep' : 'stopped'} at ${time}${record.model ? ` for ${record.model}` : ''}: ${stop.why}${by ? ` (${by})` : ''}`
      : `${record.action === 'wake' ? 'woken' : 'started'} at ${time}${by ? ` for ${by}` : ''}${record.result.startsWith('failed') ? ' (the start failed)' : ''}`;
    row.swapNote.hidden = false;
  }

  async function refreshSwaps() {
    try {
      const body = await getJSON('/api/swaps');
      if (alive) (body.swaps || []).forEach(noteSwap);
    } catch {
      // an older server or a key without the right: the notes stay empty
    }
  }

  async function showPlan(id) {
    const row = rows.get(id);
    if (!row || row.load.disabled) return;
    let plan;
    try {
      plan = await getJSON(`/api/plan?model=${encodeURIComponent(id)}`);
    } catch {
      return;
    }
    if (!alive) return;
    const seconds = plan.expected_wait_s;
    const wait = typeof seconds === 'number' ? ` · about ${seconds < 10 ? `${seconds.toFixed(1)} s` : roughSeconds(seconds)}` : '';
    const stops = (plan.stops || []).map((s) => `${s.action === 'sleep' ? 'puts to sleep' : 'stops'} ${s.model} (${s.why})`);
    const words = {
      serve: 'ready: a request is served at once', join: 'already starting',
      queue: `would wait: ${plan.reason}`, refuse: `refused: ${plan.reason}`,
    }[plan.action] || (stops.length ? `Load ${stops.join(', ')}` : `Load ${plan.action === 'wake' ? 'wakes' : 'starts'} it beside what runs`);
    row.load.title = words + wait;
  }

  function updateRow(id, state) {
    const row = rows.get(id);
    if (!row) return;
    const shown = state === 'stopped' && failureOf(id) ? 'failed' : state || 'stopped';
    row.state.textContent = shown;
    row.state.className = `badge state-${shown}`;
    showFailure(row, state === 'stopped' ? failureOf(id) : null);
    const doing = busy.get(id);
    row.load.disabled = Boolean(doing) || state === 'ready' || state === 'starting' || state === 'waking';
    row.load.textContent = doing === 'loading' ? 'Loading…' : state === 'sleeping' ? 'Wake' : 'Load';
    row.unload.disabled = Boolean(doing) || state === 'stopped' || !state;
    row.unload.textContent = doing === 'unloading' ? 'Unloading…' : 'Unload';
    const entry = running.get(id);
    row.inFlight.textContent = entry && typeof entry.in_flight === 'number' ? entry.in_flight : (entry ? '—' : '0');
    row.queued.textContent = entry && typeof entry.queued === 'number' ? entry.queued : (entry ? '—' : '0');
    row.ttl.textContent = ttlText(entry, state);
  }

  // A slim bar (sliding while the server does not say how far it is) and `loading 43% · ~12 s
  // left`, or `loading · 8 s` (time so far) when no end is in sight; hidden unless starting.
  function showLoad(row, loading) {
    const { box, bar, fill, text } = row.progress;
    box.hidden = !loading;
    if (!loading) { fill.style.width = ''; return; }  // the next start's bar grows from nothing
    const known = typeof loading.progress === 'number';
    const percent = known ? Math.round(loading.progress * 100) : null;
    const time = typeof loading.eta_s === 'number' ? `~${roughSeconds(loading.eta_s)} left` : roughSeconds(loading.elapsed_s || 0);
    text.textContent = `loading${known ? ` ${percent}%` : ''} · ${time}`;
    bar.classList.toggle('indeterminate', !known);
    fill.style.width = known ? `${percent}%` : '';
    if (known) bar.setAttribute('aria-valuenow', percent);
    else bar.removeAttribute('aria-valuenow');
    bar.setAttribute('aria-valuetext', text.textContent);
  }

  // Seconds left before the TTL unloads the model, counted down from the last /running fetch.
  function ttlText(entry, state) {
    if (!entry || state !== 'ready') return '—';
    if (entry.ttl_remaining === null || entry.ttl_remaining === undefined) {
      return entry.ttl > 0 && entry.in_flight > 0 ? 'busy' : '—';
    }
    return fmtSeconds(entry.ttl_remaining - (Date.now() - entry.fetchedAt) / 1000);
  }

  // Whole seconds under a minute ("12 s"); longer as fmtSeconds writes it ("2m 05s").
  function roughSeconds(seconds) {
    return seconds < 60 ? `${Math.round(seconds)} s` : fmtSeconds(seconds);
  }

  function stateOf(id) {
    return (live.models || []).find((m) => m.id === id)?.state;
  }

  function failureOf(id) {
    return (live.models || []).find((m) => m.id === id)?.failed || null;
  }

  // A start that failed: its reason (which ends with the server's last lines), until the next attempt.
  function showFailure(row, failed) {
    row.failure.hidden = !failed;
    if (failed) row.failure.replaceChildren(renderAnsi(failed.error));
  }

  async function refreshRunning() {
    try {
      const body = await getJSON('/running');
      const now = Date.now();
      running.clear();
      for (const entry of body.running || []) running.set(entry.model, { ...entry, fetchedAt: now });
    } catch (error) {
      if (error.status === 401 || error.status === 403) toast(error.message);
      return;
    }
    if (!alive) return;
    for (const id of rows.keys()) updateRow(id, stateOf(id));
  }
  const refreshRunningSoon = coalesce(refreshRunning, 300);

  async function loadModel(id) {
    busy.set(id, 'loading');
    updateRow(id, stateOf(id));
    try {
      await postJSON(`/api/models/load/${modelPath(id)}`);
    } catch (error) {
      toast(`Could not load ${id}: ${error.message}`);
    } finally {
      busy.delete(id);
      if (alive) { updateRow(id, stateOf(id)); refreshRunningSoon(); }
    }
  }

  async function unloadModel(id) {
    busy.set(id, 'unloading');
    updateRow(id, stateOf(id));
    try {
      await request(`/api/models/unload/${modelPath(id)}`, { method: 'POST' });
    } catch (error) {
      toast(`Could not unload ${id}: ${error.message}`);
    } finally {
      busy.delete(id);
      if (alive) { updateRow(id, stateOf(id)); refreshRunningSoon(); }
    }
  }

  async function unloadAll() {
    unloadAllButton.disabled = true;
    unloadAllButton.textContent = 'Unloading…';
    try {
      await request('/api/models/unload', { method: 'POST' });
    } catch (error) {
      toast(`Could not unload the models: ${error.message}`);
    } finally {
      unloadAllButton.disabled = false;
      unloadAllButton.textContent = 'Unload all';
      if (alive) refreshRunningSoon();
    }
  }

  // Output of a starting model ############################################################

  // While a model starts, show the tail of its own log stream. When this page saw the start
  // happen, only new output is wanted (?no-history); when the model was already starting as
  // the page opened, the history holds the beginning of this start.
  function followStart(id, state) {
    if (state !== 'starting') { stopTail(id); return; }
    if (tails.has(id) || tails.size >= MAX_TAILS) return;
    const previous = lastState.get(id);
    const fresh = previous !== undefined && previous !== 'starting';
    const tail = { controller: new AbortController(), lines: [] };
    tails.set(id, tail);
    const row = rows.get(id);
    row.tail.replaceChildren(h('span', { class: 'muted' }, 'no output yet'));
    row.tailTr.hidden = false;
    const feed = lineSplitter((line) => {
      tail.lines.push(line);
      if (tail.lines.length > TAIL_LINES) tail.lines.shift();
      row.tail.replaceChildren(renderAnsi(tail.lines.join('\n')));
    });
    streamText(`/logs/stream/${modelPath(id)}${fresh ? '?no-history' : ''}`, { signal: tail.controller.signal, onText: feed })
      .catch((error) => {
        if (error.name !== 'AbortError') row.tail.textContent = `Cannot read the output: ${error.message}`;
      });
  }

  function stopTail(id) {
    const tail = tails.get(id);
    if (!tail) return;
    tail.controller.abort();
    tails.delete(id);
    const row = rows.get(id);
    if (row) row.tailTr.hidden = true;
  }

  // Peers and virtual names ###############################################################

  function renderPeers(peers) {
    peersSection.hidden = peers.length === 0;
    if (!peers.length) return;
    const byPeer = new Map();
    for (const model of peers) {
      if (!byPeer.has(model.peerID)) byPeer.set(model.peerID, []);
      byPeer.get(model.peerID).push(model.id);
    }
    peersSection.replaceChildren(
      h('h2', {}, 'Peers'),
      h('div', { class: 'table-wrap' }, h('table', { class: 'stack' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Peer'), h('th', {}, 'Models (request them by these names)'))),
        h('tbody', {}, [...byPeer].sort(([a], [b]) => a.localeCompare(b)).map(([peer, ids]) =>
          h('tr', { 'data-testid': `peer-row-${peer}` },
            h('td', { 'data-label': 'Peer' }, h('span', { class: 'model-id' }, peer)),
            h('td', { 'data-label': 'Models' }, ids.sort().map((id) => h('span', { class: 'tag mono' }, id)))))))));
  }

  // Selectors and profile pins appear only in /v1/models.
  async function refreshVirtual() {
    let records;
    try {
      records = (await getJSON('/v1/models')).data || [];
    } catch {
      return;  // the model table already shows the essentials
    }
    if (!alive) return;
    const virtual = records.filter((r) => ['selector', 'profile'].includes(r.meta?.llamaswap?.type));
    virtualSection.hidden = virtual.length === 0;
    if (!virtual.length) return;
    virtualSection.replaceChildren(
      h('h2', {}, 'Selectors and profile names'),
      h('div', { class: 'table-wrap' }, h('table', { class: 'stack' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Kind'), h('th', {}, 'Targets'), h('th', {}, 'Status'))),
        h('tbody', {}, virtual.map((record) => {
          const meta = record.meta.llamaswap;
          const kind = meta.type === 'selector' ? `selector (${meta.strategy})` : 'profile pin';
          return h('tr', {},
            h('td', { 'data-label': 'Name' }, h('span', { class: 'model-id' }, record.id),
              record.description ? h('div', { class: 'model-desc' }, record.description) : null),
            h('td', { 'data-label': 'Kind' }, kind),
            h('td', { 'data-label': 'Targets' }, (meta.targets || []).map((t) => h('span', { class: 'tag mono' }, t))),
            h('td', { 'data-label': 'Status' }, record.status?.value || ''));
        })))));
  }

  // Profiles ##############################################################################

  async function refreshProfiles() {
    let body;
    try {
      body = await getJSON('/api/profiles');
    } catch {
      return;  // older server or no admin key: no profile switcher
    }
    if (!alive || !body.profiles?.length) { profileBox.hidden = true; return; }
    const select = h('select', { onchange: () => setProfile(select) },
      h('option', { value: '' }, '(no profile)'),
      body.profiles.map((p) => h('option', { value: p.id, title: p.description || '' }, p.id)));
    select.value = body.active || '';
    profileBox.replaceChildren(field('Profile', select, 'inline-field'));
    profileBox.hidden = false;
  }

  async function setProfile(select) {
    select.disabled = true;
    try {
      await request('/api/profiles/active', { method: 'PUT', json: { name: select.value || null } });
    } catch (error) {
      toast(`Could not switch the profile: ${error.message}`);
      select.value = live.profile || '';
    } finally {
      select.disabled = false;
    }
  }

  // In-flight requests ####################################################################

  const inflightRows = new Map();  // id -> {tr, status, elapsed, sent, entry, seenAt}

  function renderInflight(entries) {
    inflightEmpty.hidden = entries.size > 0;
    inflightTable.parentElement.hidden = entries.size === 0;
    for (const [id, entry] of entries) {
      let row = inflightRows.get(id);
      if (!row) {
        row = createInflightRow(entry);
        inflightRows.set(id, row);
        inflightBody.append(row.tr);
      }
      row.entry = entry;
      row.seenAt = Date.now();
      updateInflightRow(row);
    }
    for (const [id, row] of inflightRows) {
      if (entries.has(id)) continue;
      row.tr.remove();
      inflightRows.delete(id);
    }
  }

  function createInflightRow(entry) {
    const cancel = h('button', { type: 'button', class: 'small danger', 'data-testid': `inflight-cancel-${entry.id}` }, 'Cancel');
    cancel.addEventListener('click', async () => {
      cancel.disabled = true;
      try {
        await postJSON(`/api/inflight/${encodeURIComponent(entry.id)}/cancel`);
      } catch (error) {
        toast(`Could not cancel request ${entry.id}: ${error.message}`);
        cancel.disabled = false;
      }
    });
    const status = h('td', { 'data-label': 'Status' });
    const elapsed = h('td', { class: 'num', 'data-label': 'Elapsed' });
    const sent = h('td', { class: 'num', 'data-label': 'Sent' });
    const tr = h('tr', { 'data-testid': `inflight-row-${entry.id}` },
      h('td', { 'data-label': 'ID' }, entry.id),
      h('td', { 'data-label': 'Model' }, h('span', { class: 'model-id' }, entry.model)),
      h('td', { 'data-label': 'Request' }, h('span', { class: 'mono' }, `${entry.method} ${entry.req_path}`)),
      h('td', { 'data-label': 'Client' }, entry.remote_ip || ''),
      status, elapsed, sent,
      h('td', { 'data-label': '' }, cancel));
    return { tr, status, elapsed, sent };
  }

  function updateInflightRow(row) {
    const { entry } = row;
    const answering = Object.keys(entry.resp_headers || {}).length > 0 || entry.resp_bytes > 0;
    row.status.textContent = answering ? 'answering'
      : entry.phase === 'queued' ? `queued (position ${entry.queue_position})`
        : entry.phase === 'loading' ? 'waiting for its model to load' : 'waiting';
    // elapsed_ms was right when the event was sent: add the time since.
    row.elapsed.textContent = fmtSeconds(((entry.elapsed_ms || 0) + Date.now() - row.seenAt) / 1000);
    row.sent.textContent = fmtBytes(entry.resp_bytes || 0);
  }

  // System ################################################################################

  async function refreshSystem() {
    let body;
    try {
      body = await getJSON('/api/performance');
    } catch {
      systemStrip.hidden = true;  // monitor disabled (503) or not allowed
      return;
    }
    if (!alive) return;
    const sys = (body.sys_stats || []).at(-1);
    const gpus = new Map();
    for (const sample of body.gpu_stats || []) gpus.set(sample.id, sample);  // latest per GPU
    const items = [];
    if (sys) {
      const cores = sys.cpu_util_per_core || [];
      const cpu = cores.length ? cores.reduce((a, b) => a + b, 0) / cores.length : 0;
      items.push(`CPU ${cpu.toFixed(0)}%`, `load ${sys.load_avg_1?.toFixed(2)}`,
        `RAM ${(sys.mem_used_mb / 1024).toFixed(1)} / ${(sys.mem_total_mb / 1024).toFixed(1)} GiB`);
    }
    for (const gpu of gpus.values()) {
      items.push(`GPU ${gpu.id} ${gpu.name}: ${Math.round(gpu.gpu_util_pct)}%, ` +
        `${(gpu.mem_used_mb / 1024).toFixed(1)} / ${(gpu.mem_total_mb / 1024).toFixed(1)} GiB, ${Math.round(gpu.temp_c)}°C`);
    }
    systemStrip.replaceChildren(...items.map((text) => h('span', { class: 'muted' }, text)));
    systemStrip.hidden = items.length === 0;
  }

  // Wiring ################################################################################

  function refreshAll() {
    refreshSwaps();
    refreshRunning();
    refreshVirtual();
    refreshProfiles();
    refreshSystem();
  }

  renderModels(live.models);
  renderInflight(live.inflight);
  refreshAll();

  cleanups.push(
    on('modelStatus', (models) => { renderModels(models); refreshRunningSoon(); }),
    on('inflight', (entries) => { renderInflight(entries); refreshRunningSoon(); }),
    on('profileChanged', () => { refreshProfiles(); refreshVirtual(); }),
    on('reconnected', refreshAll),
    on('swap', noteSwap),
  );
  const tick = setInterval(() => {
    for (const id of rows.keys()) rows.get(id).ttl.textContent = ttlText(running.get(id), stateOf(id));
    for (const row of inflightRows.values()) updateInflightRow(row);
  }, 1000);
  const poll = setInterval(refreshRunning, RUNNING_POLL_MS);
  const systemPoll = setInterval(refreshSystem, SYSTEM_POLL_MS);

  return () => {
    alive = false;
    cleanups.forEach((off) => off());
    clearInterval(tick);
    clearInterval(poll);
    clearInterval(systemPoll);
    refreshRunningSoon.cancel();
    for (const id of [...tails.keys()]) stopTail(id);
  };
}
