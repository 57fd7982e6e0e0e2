// Logs page: one live log stream at a time (llama-swap's own lines, all upstream output,
// the combined log, or one model's output), read with fetch and a stream reader so it can be
// switched or stopped with an AbortController. Pause keeps reading but holds new lines back;
// Follow keeps the view at the bottom; the filter hides lines without the text; ANSI colours
// are rendered. At most the settings page's "log lines kept" (prefs.js logLines) stay in the
// page, the oldest going first; as many again may wait while paused. The page's own notes
// (stream lost, reconnected) carry the time of day in the chosen time format.

import { streamText, lineSplitter, on, live, modelPath } from '/ui/api.js';
import { h, replace, field, fmtClock } from '/ui/dom.js';
import { renderAnsi, AnsiState } from '/ui/ansi.js';
import { prefs } from '/ui/prefs.js';

const RETRY_MS = 2000;

// Fixed sources; every local model is added after them.
const FIXED_SOURCES = [
  { value: 'proxy', label: 'llama-swap (proxy)' },
  { value: 'upstream', label: 'all models (upstream)' },
  { value: 'combined', label: 'combined' },
];

function streamPath(source, withHistory) {
  const base = source === 'combined' ? '/logs/stream'
    : FIXED_SOURCES.some((s) => s.value === source) ? `/logs/stream/${source}`
      : `/logs/stream/${modelPath(source)}`;
  return withHistory ? base : `${base}?no-history`;
}

export function mount(root, { query }) {
  let source = query.get('source') || 'proxy';
  let controller = null;
  let retryTimer = null;
  let paused = false;
  let pending = [];           // lines held back while paused
  let ansi = new AnsiState(); // colours run on from one line to the next
  let maxLines = prefs.get().logLines;

  const select = h('select', { 'data-testid': 'log-source' });
  const filter = h('input', { type: 'search', placeholder: 'text to keep', 'data-testid': 'log-filter' });
  const pauseButton = h('button', { type: 'button', 'data-testid': 'log-pause', 'aria-pressed': 'false' }, 'Pause');
  const clearButton = h('button', { type: 'button', 'data-testid': 'log-clear' }, 'Clear view');
  const followBox = h('input', { type: 'checkbox', checked: true, 'data-testid': 'log-follow' });
  const output = h('div', { class: 'log-output', 'data-testid': 'log-output', role: 'log', tabindex: '0', 'aria-label': 'Log output' });

  root.append(
    h('h1', {}, 'Logs'),
    h('div', { class: 'toolbar' },
      field('Source', select),
      field('Filter', filter),
      pauseButton,
      h('label', { class: 'inline-field' }, followBox, 'Follow'),
      clearButton),
    output);

  // Sources ###############################################################################

  function renderSources() {
    const models = (live.models || []).filter((m) => !m.peerID).map((m) => m.id);
    const options = [
      ...FIXED_SOURCES.map((s) => h('option', { value: s.value }, s.label)),
      models.length ? h('optgroup', { label: 'Models' }, models.map((id) => h('option', { value: id }, id))) : null,
    ];
    // A model named in the address but not (yet) in the list still gets an option.
    const known = FIXED_SOURCES.some((s) => s.value === source) || models.includes(source);
    if (!known) options.push(h('option', { value: source }, source));
    replace(select, options);
    select.value = source;
  }

  select.addEventListener('change', () => {
    source = select.value;
    const url = new URL(location.href);
    url.searchParams.set('source', source);
    history.replaceState(null, '', url.pathname + url.search);
    clearView();
    start(true);
  });

  // Reading ###############################################################################

  // While the server is away the stream is retried every RETRY_MS; one note says so, and
  // another when it is back.
  let lost = false;

  async function start(withHistory) {
    stop();
    const current = new AbortController();
    controller = current;
    // Lines are rendered a chunk at a time: one layout and one scroll per chunk, not per line.
    const lines = [];
    const split = lineSplitter((line) => lines.push(lineElement(line)));
    const feed = (chunk) => {
      split(chunk);
      deliver(lines.splice(0));
    };
    feed.flush = () => {
      split.flush();
      deliver(lines.splice(0));
    };
    const onOpen = () => {
      if (lost) addNote('— reconnected —');
      lost = false;
    };
    try {
      await streamText(streamPath(source, withHistory), { signal: current.signal, onText: feed, onOpen });
      feed.flush();
      if (current.signal.aborted) return;
      addNote('— the stream ended (server restarting?); reconnecting —');
      lost = true;
    } catch (error) {
      if (current.signal.aborted) return;
      feed.flush();
      if (!lost) addNote(`— cannot read this log: ${error.message} —`);
      // A refused source (400 unknown model, 401/403) will not get better by retrying.
      if (error.status >= 400 && error.status < 500) return;
      lost = true;
    }
    // Reconnect without the history: the lines already shown would come again.
    retryTimer = setTimeout(() => start(false), RETRY_MS);
  }

  function stop() {
    clearTimeout(retryTimer);
    if (controller) controller.abort();
    controller = null;
  }

  // Lines #################################################################################

  function lineElement(text, note = false) {
    const element = h('div', { class: note ? 'log-line log-note' : 'log-line' });
    element.append(note ? text : renderAnsi(text, ansi));
    return element;
  }

  function deliver(elements) {
    if (!elements.length) return;
    if (paused) {
      pending.push(...elements);
      if (pending.length > maxLines) pending.splice(0, pending.length - maxLines);
    } else {
      show(elements);
    }
  }

  function addNote(text) {
    deliver([lineElement(`${fmtClock(Date.now())} ${text}`, true)]);
  }

  function show(elements) {
    const needle = filter.value.toLowerCase();
    for (const element of elements) element.hidden = Boolean(needle) && !element.textContent.toLowerCase().includes(needle);
    output.append(...elements);
    trim();
    if (followBox.checked) output.scrollTop = output.scrollHeight;
  }

  // The oldest lines go past maxLines.
  function trim() {
    let excess = output.childElementCount - maxLines;
    while (excess-- > 0) output.firstElementChild.remove();
    if (pending.length > maxLines) pending.splice(0, pending.length - maxLines);
  }

  // A smaller number on the settings page takes effect at once; a larger one keeps what comes.
  function onPrefs(now) {
    if (now.logLines === maxLines) return;
    maxLines = now.logLines;
    trim();
    if (paused) updatePauseButton();
  }

  function clearView() {
    output.replaceChildren();
    pending = [];
    ansi = new AnsiState();
    updatePauseButton();
  }

  // Controls ##############################################################################

  function updatePauseButton() {
    pauseButton.textContent = paused ? `Resume${pending.length ? ` (${pending.length} new)` : ''}` : 'Pause';
    pauseButton.setAttribute('aria-pressed', String(paused));
  }

  pauseButton.addEventListener('click', () => {
    paused = !paused;
    if (!paused) {
      const held = pending;
      pending = [];
      show(held);
    }
    updatePauseButton();
  });
  // While paused, the button counts what is waiting (checked once a second, not per line).
  const pauseCounter = setInterval(() => { if (paused) updatePauseButton(); }, 1000);

  clearButton.addEventListener('click', clearView);

  filter.addEventListener('input', () => {
    const needle = filter.value.toLowerCase();
    for (const element of output.children) {
      element.hidden = Boolean(needle) && !element.textContent.toLowerCase().includes(needle);
    }
    if (followBox.checked) output.scrollTop = output.scrollHeight;
  });

  // Scrolling up to read stops following; scrolling back to the bottom resumes it.
  output.addEventListener('scroll', () => {
    followBox.checked = output.scrollHeight - output.scrollTop - output.clientHeight < 30;
  });
  followBox.addEventListener('change', () => {
    if (followBox.checked) output.scrollTop = output.scrollHeight;
  });

  renderSources();
  const offs = [
    on('modelStatus', renderSources),
    // The event stream is back, so is the server: do not wait for the next retry.
    on('reconnected', () => { if (lost) start(false); }),
    prefs.onChange(onPrefs),
  ];
  start(true);

  return () => {
    stop();
    offs.forEach((off) => off());
    clearInterval(pauseCounter);
  };
}
