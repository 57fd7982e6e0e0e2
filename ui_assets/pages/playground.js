// Playground page: try a model. Chat streams from /v1/chat/completions (Stop aborts the fetch,
// and the server then cancels the upstream request); reasoning deltas go to a collapsible
// block apart from the answer, and the answer is rendered by markdown.js, which escapes
// everything the model wrote. Image generation, speech and transcription tabs appear only for
// models whose capabilities (/v1/models) say they can do it; so does Rerank (POST /v1/rerank,
// for a model marked `reranker`). Concurrency sends one prompt to several models at once and
// shows each request's way through llama-swap as it happens: queued, its model loading,
// waiting, reasoning, answering, with the time each step took.
//
// The conversation, the settings and the last results live at module level, so they survive a
// visit to another page; a reply still streaming when the page is left is stopped.

import { getJSON, request, lineSplitter, live, on } from '/ui/api.js';
import { h, field, toast, fmtMs } from '/ui/dom.js';
import { renderMarkdown } from '/ui/markdown.js';

const settings = { model: '', system: '', temperature: '', maxTokens: '', tab: 'chat' };
let conversation = [];  // {role: 'user'|'assistant', content, reasoning, error, meta, stopped}
const rerankSettings = { query: '', documents: '', topN: '' };
let rerankShown = null;  // the last ranking: {rows: [{index, score, text}], summary}
const concurrencySettings = { models: new Set(), prompt: '', maxTokens: '256' };
let lanes = [];          // the last "Send to all": one lane per model (see newLane)
let lanesView = null;    // the mounted Concurrency tab's {draw(lane), refresh()}; null when none is

const TABS = [
  { id: 'chat', label: 'Chat', capability: null },
  { id: 'images', label: 'Images', capability: 'image_generation' },
  { id: 'speech', label: 'Speech', capability: 'audio_speech' },
  { id: 'transcription', label: 'Transcription', capability: 'audio_transcriptions' },
  { id: 'rerank', label: 'Rerank', capability: 'reranker' },
  { id: 'concurrency', label: 'Concurrency', capability: null },  // picks its own models
];

export function mount(root, { query }) {
  const page = new AbortController();   // aborts whatever this page still has running
  let models = [];                      // /v1/models records

  const modelSelect = h('select', { 'data-testid': 'pg-model' });
  const tabList = h('div', { class: 'tabs', role: 'tablist', 'aria-label': 'Mode' });
  const panels = {
    chat: chatPanel(),
    images: imagesPanel(),
    speech: speechPanel(),
    transcription: transcriptionPanel(),
    rerank: rerankPanel(),
    concurrency: concurrencyPanel(),
  };
  const modelBar = h('div', { class: 'toolbar' }, field('Model', modelSelect));
  const tabButtons = {};
  for (const tab of TABS) {
    const button = h('button', {
      type: 'button', role: 'tab', id: `pg-tab-${tab.id}`, 'aria-controls': `pg-panel-${tab.id}`,
      'data-testid': `pg-tab-${tab.id}`, onclick: () => selectTab(tab.id),
    }, tab.label);
    tabButtons[tab.id] = button;
    tabList.append(button);
    Object.assign(panels[tab.id], { id: `pg-panel-${tab.id}`, role: 'tabpanel' });
    panels[tab.id].setAttribute('aria-labelledby', `pg-tab-${tab.id}`);
  }

  root.append(
    h('h1', {}, 'Playground'),
    modelBar,
    tabList,
    ...Object.values(panels));

  // Models and tabs #######################################################################

  async function loadModels() {
    try {
      models = (await getJSON('/v1/models', { signal: page.signal })).data || [];
    } catch (error) {
      if (error.name !== 'AbortError') toast(`Could not list the models: ${error.message}`);
      return;
    }
    const wanted = query.get('model') || settings.model;
    modelSelect.replaceChildren(...models.map((m) =>
      h('option', { value: m.id }, m.name && m.name !== m.id ? `${m.id} — ${m.name}` : m.id)));
    if (models.some((m) => m.id === wanted)) modelSelect.value = wanted;
    settings.model = modelSelect.value;
    updateTabs();
    panels.concurrency.listModels(models);
  }

  modelSelect.addEventListener('change', () => {
    settings.model = modelSelect.value;
    updateTabs();
  });

  function capabilities() {
    return models.find((m) => m.id === settings.model)?.capabilities || {};
  }

  function updateTabs() {
    const can = capabilities();
    for (const tab of TABS) tabButtons[tab.id].hidden = Boolean(tab.capability) && !can[tab.capability];
    const current = TABS.find((t) => t.id === settings.tab);
    selectTab(current && !tabButtons[current.id].hidden ? current.id : 'chat');
  }

  function selectTab(id) {
    settings.tab = id;
    for (const tab of TABS) {
      const selected = tab.id === id;
      tabButtons[tab.id].setAttribute('aria-selected', String(selected));
      panels[tab.id].hidden = !selected;
    }
    modelBar.hidden = id === 'concurrency';  // that tab has its own choice of models
  }

  // Chat ##################################################################################

  function chatPanel() {
    const system = h('textarea', { rows: 2, 'data-testid': 'pg-system', placeholder: 'optional', value: settings.system });
    const temperature = h('input', { type: 'number', min: 0, max: 2, step: 0.1, placeholder: 'server default',
      'data-testid': 'pg-temperature', value: settings.temperature });
    const maxTokens = h('input', { type: 'number', min: 1, step: 1, placeholder: 'server default',
      'data-testid': 'pg-max-tokens', value: settings.maxTokens });
    const log = h('div', { class: 'chat-log', 'aria-live': 'polite' });
    const input = h('textarea', { rows: 3, 'data-testid': 'pg-input', placeholder: 'Message (Enter sends, Shift+Enter for a new line)' });
    const send = h('button', { type: 'button', class: 'primary', 'data-testid': 'pg-send' }, 'Send');
    const stop = h('button', { type: 'button', 'data-testid': 'pg-stop', disabled: true }, 'Stop');
    const clear = h('button', { type: 'button', 'data-testid': 'pg-clear' }, 'Clear chat');
    let streaming = null;  // AbortController of the reply being streamed

    system.addEventListener('input', () => { settings.system = system.value; });
    temperature.addEventListener('input', () => { settings.temperature = temperature.value; });
    maxTokens.addEventListener('input', () => { settings.maxTokens = maxTokens.value; });
    input.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        sendMessage();
      }
    });
    send.addEventListener('click', sendMessage);
    stop.addEventListener('click', () => streaming?.abort());
    clear.addEventListener('click', () => {
      streaming?.abort();
      conversation = [];
      renderLog();
    });
    page.signal.addEventListener('abort', () => streaming?.abort());

    // Each message gets its elements once; the reply being streamed is updated in place.
    const views = new Map();  // message -> {answer, reasoning, reasoningText, error, meta}

    function renderLog() {
      views.clear();
      log.replaceChildren(...conversation.map(messageElement));
      markLastAnswer();
    }

    function messageElement(message) {
      if (message.role === 'user') {
        return h('div', { class: 'msg user' }, h('div', { class: 'role' }, 'you'), message.content);
      }
      const reasoningText = h('div', { class: 'reasoning-text' });
      const reasoning = h('details', { class: 'reasoning', hidden: true },
        h('summary', {}, 'reasoning'), reasoningText);
      const answer = h('div', { class: 'md answer' });
      const error = h('div', { class: 'error-text', hidden: true });
      const meta = h('div', { class: 'meta' });
      views.set(message, { answer, reasoning, reasoningText, error, meta, autoClosed: false });
      updateMessage(message);
      return h('div', { class: 'msg assistant' }, h('div', { class: 'role' }, 'assistant'), reasoning, answer, error, meta);
    }

    function updateMessage(message) {
      const view = views.get(message);
      if (!view) return;
      if (message.reasoning) {
        view.reasoning.hidden = false;
        view.reasoningText.textContent = message.reasoning;
        // Open while the model thinks; fold once, when the answer starts.
        if (!message.content && !view.reasoning.open && !view.autoClosed) view.reasoning.open = true;
        if (message.content && !view.autoClosed) { view.reasoning.open = false; view.autoClosed = true; }
      }
      view.answer.innerHTML = renderMarkdown(message.content);  // renderMarkdown escapes all model text
      view.error.hidden = !message.error;
      view.error.textContent = message.error || '';
      view.meta.textContent = message.meta || '';
    }

    // Tests read the last answer and its reasoning through these two hooks.
    function markLastAnswer() {
      for (const element of log.querySelectorAll('[data-testid="pg-answer"], [data-testid="pg-reasoning"]')) {
        element.removeAttribute('data-testid');
      }
      const last = [...views.values()].at(-1);
      if (!last) return;
      last.answer.dataset.testid = 'pg-answer';
      last.reasoning.dataset.testid = 'pg-reasoning';
    }

    async function sendMessage() {
      const text = input.value.trim();
      if (!text || streaming || !settings.model) return;
      input.value = '';
      const history = conversation.filter((m) => !m.error && (m.content || m.role === 'user'));
      const user = { role: 'user', content: text };
      const reply = { role: 'assistant', content: '', reasoning: '', error: null, meta: 'waiting…' };
      conversation.push(user, reply);
      log.append(messageElement(user), messageElement(reply));
      markLastAnswer();
      log.lastElementChild.scrollIntoView({ block: 'nearest' });

      const body = {
        model: settings.model,
        messages: [
          ...(settings.system.trim() ? [{ role: 'system', content: settings.system }] : []),
          ...[...history, user].map(({ role, content }) => ({ role, content })),
        ],
        stream: true,
      };
      if (settings.temperature !== '') body.temperature = Number(settings.temperature);
      if (settings.maxTokens !== '') body.max_tokens = Number(settings.maxTokens);

      streaming = new AbortController();
      setStreaming(true);
      const started = performance.now();
      let firstToken = null;
      let loadingText = false;  // llama-swap's own words while the model loads (sendLoadingState)
      let usage = null;
      let timings = null;
      let frame = 0;
      const redraw = () => {
        if (!frame) frame = requestAnimationFrame(() => { frame = 0; updateMessage(reply); });
      };
      const onDelta = (chunk) => {
        if (chunk.error) reply.error = chunk.error.message || JSON.stringify(chunk.error);
        const choice = chunk.choices?.[0] || {};
        const delta = choice.delta || choice.message || {};
        const reasoning = delta.reasoning_content || delta.reasoning || '';
        const content = typeof delta.content === 'string' ? delta.content : '';
        if (firstToken === null && reasoning.startsWith(LOADING_RULE)) loadingText = true;
        if (loadingText) {
          if (reasoning.includes('Done! (')) loadingText = false;  // the model's own tokens come next
        } else if ((reasoning || content) && firstToken === null) {
          firstToken = performance.now();
        }
        reply.reasoning += reasoning;
        reply.content += content;
        usage = chunk.usage || usage;
        timings = chunk.timings || timings;
        reply.meta = 'streaming…';
        redraw();
      };
      try {
        const response = await request('/v1/chat/completions', { method: 'POST', json: body, signal: streaming.signal });
        if ((response.headers.get('Content-Type') || '').includes('text/event-stream')) {
          await readServerSentEvents(response, onDelta);
        } else {
          onDelta(await response.json());  // a server that ignored "stream": one whole answer
        }
      } catch (error) {
        if (error.name === 'AbortError') reply.stopped = true;
        else reply.error = error.message;
      } finally {
        cancelAnimationFrame(frame);
        reply.meta = summary(reply, usage, timings, started, firstToken);
        updateMessage(reply);
        streaming = null;
        setStreaming(false);
      }
    }

    function setStreaming(on) {
      send.disabled = on;
      stop.disabled = !on;
    }

    renderLog();
    return h('section', {},
      h('div', { class: 'pg-settings' },
        field('System prompt', system, 'field wide'),
        field('Temperature', temperature),
        field('Max tokens', maxTokens)),
      log,
      h('div', { class: 'composer' },
        field('Message', input, 'field grow'),
        h('div', { class: 'buttons' }, send, stop, clear)));
  }

  // Images ################################################################################

  function imagesPanel() {
    const prompt = h('textarea', { rows: 3, 'data-testid': 'pg-image-prompt' });
    const size = h('select', { 'data-testid': 'pg-image-size' },
      ['256x256', '512x512', '1024x1024'].map((s) => h('option', { value: s }, s)));
    size.value = '512x512';
    const count = h('input', { type: 'number', min: 1, max: 4, value: '1', 'data-testid': 'pg-image-count' });
    const generate = h('button', { type: 'button', class: 'primary', 'data-testid': 'pg-image-generate' }, 'Generate');
    const status = h('p', { class: 'muted', 'aria-live': 'polite' });
    const images = h('div', { class: 'images', 'data-testid': 'pg-images' });

    generate.addEventListener('click', () => run(generate, status, async () => {
      images.replaceChildren();
      const body = await (await request('/v1/images/generations', {
        method: 'POST', signal: page.signal,
        json: { model: settings.model, prompt: prompt.value, n: Number(count.value) || 1, size: size.value },
      })).json();
      const sources = (body.data || []).map((item) =>
        item.b64_json ? `data:image/png;base64,${item.b64_json}`
          : /^(https?:|data:image\/)/.test(item.url || '') ? item.url : null).filter(Boolean);
      images.append(...sources.map((src, i) => h('img', { src, alt: `generated image ${i + 1}` })));
      return sources.length ? `${sources.length} image(s)` : 'The answer held no images.';
    }));

    return h('section', {},
      field('Prompt', prompt),
      h('div', { class: 'toolbar', style: 'margin-top:8px' }, field('Size', size), field('Count', count), generate),
      status, images);
  }

  // Speech ################################################################################

  function speechPanel() {
    const text = h('textarea', { rows: 3, 'data-testid': 'pg-speech-input' });
    const voice = h('input', { type: 'text', placeholder: 'server default', 'data-testid': 'pg-speech-voice' });
    const generate = h('button', { type: 'button', class: 'primary', 'data-testid': 'pg-speech-generate' }, 'Speak');
    const status = h('p', { class: 'muted', 'aria-live': 'polite' });
    const audio = h('audio', { controls: true, hidden: true, 'data-testid': 'pg-audio' });
    let audioUrl = null;
    page.signal.addEventListener('abort', () => { if (audioUrl) URL.revokeObjectURL(audioUrl); });

    generate.addEventListener('click', () => run(generate, status, async () => {
      const body = { model: settings.model, input: text.value };
      if (voice.value.trim()) body.voice = voice.value.trim();
      const response = await request('/v1/audio/speech', { method: 'POST', json: body, signal: page.signal });
      const type = response.headers.get('Content-Type') || '';
      if (type.includes('json') || type.startsWith('text/')) {
        throw new Error(`The server answered ${type}, not audio: ${(await response.text()).slice(0, 300)}`);
      }
      if (audioUrl) URL.revokeObjectURL(audioUrl);
      audioUrl = URL.createObjectURL(await response.blob());
      audio.src = audioUrl;
      audio.hidden = false;
      return '';
    }));

    return h('section', {},
      field('Text', text),
      h('div', { class: 'toolbar', style: 'margin-top:8px' }, field('Voice', voice), generate),
      status, audio);
  }

  // Transcription #########################################################################

  function transcriptionPanel() {
    const file = h('input', { type: 'file', accept: 'audio/*,video/*', 'data-testid': 'pg-transcribe-file' });
    const send = h('button', { type: 'button', class: 'primary', 'data-testid': 'pg-transcribe-send' }, 'Transcribe');
    const status = h('p', { class: 'muted', 'aria-live': 'polite' });
    const transcript = h('pre', { class: 'body', hidden: true, 'data-testid': 'pg-transcript' });

    send.addEventListener('click', () => run(send, status, async () => {
      if (!file.files.length) throw new Error('Choose an audio file first.');
      const form = new FormData();
      form.append('model', settings.model);
      form.append('file', file.files[0]);
      // No Content-Type header: the browser writes the multipart boundary itself.
      const response = await request('/v1/audio/transcriptions', { method: 'POST', body: form, signal: page.signal });
      const text = await response.text();
      let result = text;
      try { result = JSON.parse(text).text ?? text; } catch { /* plain text answer */ }
      transcript.textContent = result;
      transcript.hidden = false;
      return '';
    }));

    return h('section', {}, field('Audio file', file),
      h('div', { class: 'toolbar', style: 'margin-top:8px' }, send), status, transcript);
  }

  // Rerank ################################################################################

  function rerankPanel() {
    const queryInput = h('textarea', { rows: 2, 'data-testid': 'pg-rerank-query', value: rerankSettings.query,
      placeholder: 'What the documents are ranked by' });
    const documentsInput = h('textarea', { rows: 6, 'data-testid': 'pg-rerank-documents',
      value: rerankSettings.documents, placeholder: 'One document per line' });
    const topN = h('input', { type: 'number', min: 1, step: 1, placeholder: 'all', 'data-testid': 'pg-rerank-top-n',
      value: rerankSettings.topN });
    const send = h('button', { type: 'button', class: 'primary', 'data-testid': 'pg-rerank-send' }, 'Rerank');
    const status = h('p', { class: 'muted', 'aria-live': 'polite', 'data-testid': 'pg-rerank-status' });
    const list = h('ol', { class: 'rerank-results', 'data-testid': 'pg-rerank-results' });

    queryInput.addEventListener('input', () => { rerankSettings.query = queryInput.value; });
    documentsInput.addEventListener('input', () => { rerankSettings.documents = documentsInput.value; });
    topN.addEventListener('input', () => { rerankSettings.topN = topN.value; });

    send.addEventListener('click', () => run(send, status, async () => {
      const query = queryInput.value.trim();
      const documents = documentsInput.value.split('\n').map((line) => line.trim()).filter(Boolean);
      if (!query) throw new Error('Write a query first.');
      if (!documents.length) throw new Error('Add at least one document, one per line.');
      const body = { model: settings.model, query, documents };
      if (topN.value !== '') body.top_n = Number(topN.value);
      rerankShown = null;
      showRanking();
      const started = performance.now();
      const text = await (await request('/v1/rerank', { method: 'POST', json: body, signal: page.signal })).text();
      const took = fmtMs(performance.now() - started);
      let answer;
      try { answer = JSON.parse(text); } catch { answer = null; }
      // llama.cpp answers {results: [{index, relevance_score}]}; others name them data / score.
      const results = answer?.results ?? answer?.data;
      if (!Array.isArray(results)) throw new Error(`The answer held no results (${took}): ${text.slice(0, 300)}`);
      const rows = results.map((r) => ({
        index: r.index,
        score: Number(r.relevance_score ?? r.score),
        text: documents[r.index] ?? r.document?.text ?? (typeof r.document === 'string' ? r.document : ''),
      })).sort((a, b) => sortable(b.score) - sortable(a.score));
      const cut = rows.length < documents.length ? ` of ${documents.length} documents` : '';
      rerankShown = { rows, summary: `${rows.length} result${rows.length === 1 ? '' : 's'}${cut} · ${took}` };
      showRanking();
      return rerankShown.summary;
    }));

    // The bar spans 0..1 for scores in that range (most rerankers); raw logits, which may be
    // negative or above 1, stretch the scale to the lowest and the highest of the answer.
    function showRanking() {
      const rows = rerankShown?.rows || [];
      const scores = rows.map((r) => r.score).filter(Number.isFinite);
      const low = Math.min(0, ...scores);
      const high = Math.max(1, ...scores);
      list.replaceChildren(...rows.map((row, rank) => {
        const share = Number.isFinite(row.score) ? (row.score - low) / (high - low) : 0;
        const fill = h('span', { class: 'score-fill' });
        fill.style.width = `${Math.max(0, Math.min(1, share)) * 100}%`;
        return h('li', { class: 'rerank-result', 'data-testid': 'pg-rerank-result' },
          h('div', { class: 'rerank-head' },
            h('span', { class: 'rank' }, `${rank + 1}.`),
            h('span', { class: 'score', 'data-testid': 'pg-rerank-score' },
              Number.isFinite(row.score) ? row.score.toFixed(3) : String(row.score)),
            h('span', { class: 'muted' }, `document #${row.index}`)),
          h('div', { class: 'score-bar', 'aria-hidden': 'true' }, fill),
          h('div', { class: 'rerank-doc', 'data-testid': 'pg-rerank-doc' }, row.text));
      }));
    }

    showRanking();
    status.textContent = rerankShown?.summary || '';
    return h('section', {},
      field('Query', queryInput),
      field('Documents (one per line)', documentsInput, 'field pg-gap'),
      h('div', { class: 'toolbar', style: 'margin-top:8px' }, field('Top N', topN), send),
      status, list);
  }

  // Concurrency ###########################################################################
  //
  // The same streaming chat request to each chosen model at once, each with its own
  // AbortController. Until its answer begins, a lane learns where its request is from the
  // in-flight list (api.js `live.inflight`, the `inflight` topic): queued (and where), loading
  // (its model starting for it) or waiting (for the first token). A lane finds its entry by
  // the X-Playground-Run header it sent, a marker unique to the lane: the server lists each
  // request's headers in its entry, so the match is exact even when several requests go to one
  // model at once, from this page or another client; times or model names alone could not tell
  // them apart. Once the answer streams, the stream says the rest: llama-swap's loading text
  // (sendLoadingState), the model's reasoning, then its answer.
  //
  // The event stream announces an entry when the request arrives and when its turn comes, not
  // when it joins the queue: until their answers begin, the lanes also read GET /api/inflight
  // once a second. What that says of an entry counts only where no event spoke of the entry
  // since the read was asked for (an upsert replaces the entry's object in live.inflight).

  function concurrencyPanel() {
    const picker = h('fieldset', { class: 'conc-models', 'data-testid': 'pg-conc-models' },
      h('legend', {}, 'Models'));
    const choices = h('div', { class: 'conc-choices' });
    picker.append(choices);
    const prompt = h('textarea', { rows: 3, 'data-testid': 'pg-conc-prompt', value: concurrencySettings.prompt,
      placeholder: 'The prompt every model gets' });
    const maxTokens = h('input', { type: 'number', min: 1, step: 1, placeholder: 'server default',
      'data-testid': 'pg-conc-max-tokens', value: concurrencySettings.maxTokens });
    const send = h('button', { type: 'button', class: 'primary', 'data-testid': 'pg-conc-send' }, 'Send to all');
    const stop = h('button', { type: 'button', 'data-testid': 'pg-conc-stop', disabled: true }, 'Stop');
    const status = h('p', { class: 'muted', 'aria-live': 'polite', 'data-testid': 'pg-conc-status' });
    const board = h('div', { class: 'lanes', 'data-testid': 'pg-lanes' });
    let local = [];                 // the local models of /v1/models
    const details = new Map();      // model id -> its state/group line in the picker
    const views = new Map();        // lane -> its elements
    let ticker = null;              // redraws the running lanes' clocks

    prompt.addEventListener('input', () => { concurrencySettings.prompt = prompt.value; });
    maxTokens.addEventListener('input', () => { concurrencySettings.maxTokens = maxTokens.value; });
    send.addEventListener('click', sendToAll);
    stop.addEventListener('click', stopAll);

    const offInflight = on('inflight', (entries) => followInflight(entries, null));
    const offStatus = on('modelStatus', describeModels);
    lanesView = { draw: scheduleDraw, refresh };
    page.signal.addEventListener('abort', () => {
      for (const lane of lanes) lane.controller?.abort();
      offInflight();
      offStatus();
      clearInterval(ticker);
      for (const view of views.values()) cancelAnimationFrame(view.frame);
      if (lanesView?.refresh === refresh) lanesView = null;
    });

    function listModels(records) {
      local = records.filter((m) => (m.meta?.llamaswap?.type ?? 'model') === 'model');
      for (const id of [...concurrencySettings.models]) {
        if (!local.some((m) => m.id === id)) concurrencySettings.models.delete(id);
      }
      details.clear();
      choices.replaceChildren(...local.map((m) => {
        const box = h('input', { type: 'checkbox', value: m.id, checked: concurrencySettings.models.has(m.id),
          'data-testid': `pg-conc-model-${m.id}` });
        box.addEventListener('change', () => {
          if (box.checked) concurrencySettings.models.add(m.id);
          else concurrencySettings.models.delete(m.id);
        });
        const detail = h('span', { class: 'muted' });
        details.set(m.id, detail);
        return h('label', { class: 'conc-model' }, box, h('span', { class: 'mono' }, m.id), detail);
      }));
      if (!local.length) choices.append(h('span', { class: 'muted' }, 'No local models.'));
      describeModels(live.models || []);
    }

    // Each model's state and swap group beside its name: what a swap will do is easier to read.
    function describeModels(statuses) {
      for (const entry of statuses) {
        const detail = details.get(entry.id);
        if (!detail) continue;
        detail.textContent = [entry.state, entry.group ? `group ${entry.group.name}` : ''].filter(Boolean).join(' · ');
      }
    }

    function sendToAll() {
      if (lanes.some(running)) return;
      const chosen = local.map((m) => m.id).filter((id) => concurrencySettings.models.has(id));
      status.className = 'error-text';
      if (!chosen.length) { status.textContent = 'Pick at least one model.'; return; }
      if (!prompt.value.trim()) { status.textContent = 'Write a prompt first.'; return; }
      status.className = 'muted';
      status.textContent = chosen.length === 1 ? 'Sent to 1 model.' : `Sent to ${chosen.length} models at once.`;
      const batch = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
      lanes = chosen.map((model, i) => newLane(model, `${batch}-${i}`));
      renderBoard();
      for (const lane of lanes) runLane(lane, prompt.value, maxTokens.value);
      refresh();
    }

    // Requests still waiting are cut first, the answering ones once the server has let the
    // waiting ones go (or after a second): cut in the other order, the server would hand the
    // freed turn to a waiting request and start swapping its model in, just before that
    // request is cut too.
    async function stopAll() {
      const active = lanes.filter(running);
      const waiting = active.filter((lane) => !ANSWERING.has(lane.phase));
      const answering = active.filter((lane) => ANSWERING.has(lane.phase));
      for (const lane of waiting) lane.controller?.abort();
      if (waiting.length && answering.length) await leftTheServer(waiting.map((lane) => lane.marker), 1000);
      for (const lane of answering) lane.controller?.abort();
    }

    // entries: live.inflight after an event (asked: null), or a read of /api/inflight asked for
    // at performance.now() `asked`.
    function followInflight(entries, asked) {
      for (const lane of lanes) {
        if (!running(lane) || lane.responded) continue;
        const entry = [...entries.values()].find((e) => headerOf(e.req_headers, RUN_HEADER) === lane.marker);
        if (!entry) continue;
        if (asked === null) {
          if (entry === lane.entry) continue;  // an event about another request
          lane.entry = entry;
          lane.entryHeardAt = performance.now();
        } else if (lane.entryHeardAt > asked) {
          continue;  // an event told of it after the read was asked for: that is newer
        }
        // "answering" means the answer's headers are on their way: the stream takes it from there.
        if (entry.phase === 'queued') setPhase(lane, 'queued', entry.queue_position ?? null);
        else if (entry.phase === 'loading' || entry.phase === 'waiting') setPhase(lane, entry.phase);
        scheduleDraw(lane);
      }
    }

    // The Send/Stop buttons and the clock that keeps the running lanes' times moving.
    function refresh() {
      const busy = lanes.some(running);
      send.disabled = busy;
      stop.disabled = !busy;
      if (busy && ticker === null) {
        let ticks = 0;
        ticker = setInterval(() => {
          for (const lane of lanes) if (running(lane)) scheduleDraw(lane);
          if (++ticks % 5 === 1) readInflight();  // 0.2 s after the send, then every second
        }, 200);
      } else if (!busy && ticker !== null) {
        clearInterval(ticker);
        ticker = null;
      }
    }

    let reading = false;
    async function readInflight() {
      if (reading || !lanes.some((lane) => running(lane) && !lane.responded)) return;
      reading = true;
      const asked = performance.now();
      try {
        const body = await getJSON('/api/inflight', { signal: page.signal });
        followInflight(new Map((body.requests || []).map((entry) => [entry.id, entry])), asked);
      } catch { /* the events still tell; the next read may work */ } finally {
        reading = false;
      }
    }

    function renderBoard() {
      for (const view of views.values()) cancelAnimationFrame(view.frame);
      views.clear();
      board.replaceChildren(...lanes.map(laneElement));
    }

    function laneElement(lane) {
      const id = lane.model;
      const view = {
        phase: h('span', { class: 'badge', 'data-testid': `pg-lane-phase-${id}` }),
        phases: h('div', { class: 'lane-phases', 'data-testid': `pg-lane-phases-${id}` }),
        loadingText: h('div', { class: 'reasoning-text' }),
        reasoningText: h('div', { class: 'reasoning-text' }),
        answer: h('div', { class: 'lane-answer', 'data-testid': `pg-lane-answer-${id}` }),
        error: h('div', { class: 'error-text', 'data-testid': `pg-lane-error-${id}`, hidden: true }),
        stats: {},
        frame: 0,
      };
      view.loading = h('details', { class: 'reasoning', hidden: true, 'data-testid': `pg-lane-loading-${id}` },
        h('summary', {}, 'loading text'), view.loadingText);
      view.reasoning = h('details', { class: 'reasoning', hidden: true, 'data-testid': `pg-lane-reasoning-${id}` },
        h('summary', {}, 'reasoning'), view.reasoningText);
      const stats = h('dl', { class: 'lane-stats', 'data-testid': `pg-lane-stats-${id}` });
      for (const [key, label] of [['firstByte', 'First byte'], ['tokens', 'Tokens'], ['speed', 'Speed'],
        ['total', 'Total']]) {
        view.stats[key] = h('dd', { 'data-testid': `pg-lane-${key}-${id}` });
        stats.append(h('div', {}, h('dt', {}, label), view.stats[key]));
      }
      view.root = h('article', { class: 'lane', 'data-testid': `pg-lane-${id}` },
        h('div', { class: 'lane-head' }, h('h3', { class: 'lane-model' }, id), view.phase),
        view.phases, view.loading, view.reasoning, view.answer, view.error, stats);
      views.set(lane, view);
      draw(lane);
      return view.root;
    }

    // Open while its step lasts, folded once when it ends; the user's own clicks win after that.
    function fold(details, now, view, key) {
      if (now && !view[key]) { details.open = true; view[key] = 'opened'; }
      if (!now && view[key] === 'opened') { details.open = false; view[key] = 'folded'; }
    }

    function scheduleDraw(lane) {
      const view = views.get(lane);
      if (view && !view.frame) view.frame = requestAnimationFrame(() => { view.frame = 0; draw(lane); });
    }

    function draw(lane) {
      const view = views.get(lane);
      if (!view) return;
      const now = lane.ended ?? performance.now();
      view.root.dataset.phase = lane.phase;
      view.phase.className = `badge phase-${lane.phase}`;
      view.phase.textContent = lane.phase === 'queued' && lane.queuePosition
        ? `queued #${lane.queuePosition}` : lane.phase;
      view.phases.textContent = lane.phases
        .filter((p, i) => i === lane.phases.length - 1 || (p.end - p.start) >= 50)  // blinks left out
        .map((p) => `${p.name}${p.position ? ` #${p.position}` : ''} ${fmtMs((p.end ?? now) - p.start)}`)
        .join(' → ');
      view.loading.hidden = !lane.loading;
      view.loadingText.textContent = lane.loading;
      fold(view.loading, lane.phase === 'loading', view, 'loadingFold');
      view.reasoning.hidden = !lane.reasoning;
      fold(view.reasoning, lane.phase === 'reasoning', view, 'reasoningFold');
      view.reasoningText.textContent = lane.reasoning;
      view.answer.textContent = lane.content;
      view.error.hidden = !lane.error;
      view.error.textContent = lane.error || '';
      const s = laneStats(lane);
      view.stats.firstByte.textContent = lane.firstByte !== null ? fmtMs(lane.firstByte - lane.started)
        : running(lane) ? '…' : '—';
      view.stats.tokens.textContent = s.tokens ? String(s.tokens) : '—';
      view.stats.speed.textContent = s.speed ? `${s.speed.toFixed(1)} t/s` : '—';
      view.stats.total.textContent = fmtMs(now - lane.started);
    }

    async function runLane(lane, text, max) {
      const body = { model: lane.model, messages: [{ role: 'user', content: text }], stream: true };
      if (max !== '') body.max_tokens = Number(max);
      lane.controller = new AbortController();  // Stop and leaving the page abort it (stopAll)
      let loadingText = false;  // inside llama-swap's own words while the model loads
      const onChunk = (chunk) => {
        if (chunk.error) lane.error = chunk.error.message || JSON.stringify(chunk.error);
        const choice = chunk.choices?.[0] || {};
        const delta = choice.delta || choice.message || {};
        const reasoning = delta.reasoning_content || delta.reasoning || '';
        const content = typeof delta.content === 'string' ? delta.content : '';
        if (!lane.loading && !lane.reasoning && !lane.content && reasoning.startsWith(LOADING_RULE)) loadingText = true;
        if (loadingText) {
          lane.loading += reasoning;
          setPhase(lane, 'loading');
          if (reasoning.includes('Done! (')) {  // loaded: the model's own tokens come next
            loadingText = false;
            setPhase(lane, 'waiting');
          }
        } else {
          if (reasoning) {
            lane.reasoning += reasoning;
            if (!lane.content) setPhase(lane, 'reasoning');
          }
          if (content) {
            if (lane.firstContent === null) lane.firstContent = performance.now();
            lane.content += content;
            lane.contentChunks += 1;
            lane.lastContent = performance.now();
            setPhase(lane, 'answering');
          }
        }
        lane.usage = chunk.usage || lane.usage;
        lane.timings = chunk.timings || lane.timings;
        lanesView?.draw(lane);
      };
      const firstBytes = () => { if (lane.firstByte === null) lane.firstByte = performance.now(); };
      try {
        const response = await request('/v1/chat/completions', {
          method: 'POST', json: body, signal: lane.controller.signal, headers: { [RUN_HEADER]: lane.marker } });
        lane.responded = true;
        if ((response.headers.get('Content-Type') || '').includes('text/event-stream')) {
          await readServerSentEvents(response, onChunk, firstBytes);
        } else {
          const answer = await response.json();
          firstBytes();
          onChunk(answer);
        }
        lane.final = lane.error ? 'error' : 'done';
      } catch (error) {
        if (error.name === 'AbortError') {
          lane.final = 'stopped';
        } else {
          lane.error = error.message;
          lane.final = 'error';
        }
      } finally {
        finishLane(lane);
        lanesView?.draw(lane);
        lanesView?.refresh();
      }
    }

    renderBoard();
    refresh();
    const section = h('section', {},
      h('p', { class: 'muted conc-intro' }, 'One prompt to every chosen model at once: each lane shows where its ',
        'request is — queued behind others, its model loading, waiting for the first token, reasoning, ',
        'answering — and how long each step took. Models that cannot run together take turns.'),
      picker,
      field('Prompt', prompt),
      h('div', { class: 'toolbar', style: 'margin-top:8px' }, field('Max tokens', maxTokens), send, stop),
      status, board);
    section.listModels = listModels;
    return section;
  }

  // Runs one request of the image/speech/transcription tabs with its button busy; the task
  // returns a line for the status, or throws with the message to show.
  async function run(button, status, task) {
    button.disabled = true;
    status.className = 'muted';
    status.textContent = 'working…';
    try {
      status.textContent = await task();
    } catch (error) {
      if (error.name === 'AbortError') return;
      status.className = 'error-text';
      status.textContent = error.message;
    } finally {
      button.disabled = false;
    }
  }

  selectTab(settings.tab);
  loadModels();
  return () => page.abort();
}

// Reads an event stream of chat completion chunks and hands each JSON payload to onChunk;
// onBytes (optional) hears of every piece of the body as it arrives.
async function readServerSentEvents(response, onChunk, onBytes) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const feed = lineSplitter((line) => {
    if (!line.startsWith('data:')) return;
    const payload = line.slice(5).trim();
    if (!payload || payload === '[DONE]') return;
    try { onChunk(JSON.parse(payload)); } catch (error) { console.warn('unreadable chunk', payload, error); }
  });
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (onBytes) onBytes();
    feed(value);
  }
  feed.flush();
}

// How llama-swap's loading text (sendLoadingState) begins: its time is the load's, not the model's.
const LOADING_RULE = '\u2501\u2501\u2501\u2501\u2501';

// "12 tokens · 41.3 t/s · 0.6 s": speed from llama-server's timings when it sends them, else
// measured from the first token (of the model's own, not the loading text) to the end.
function summary(reply, usage, timings, started, firstToken) {
  const parts = [];
  if (reply.stopped) parts.push('stopped');
  const tokens = usage?.completion_tokens ?? timings?.predicted_n;
  if (tokens) parts.push(`${tokens} tokens`);
  const end = performance.now();
  const speed = timings?.predicted_per_second
    ?? (tokens && firstToken !== null && end > firstToken ? tokens / ((end - firstToken) / 1000) : null);
  if (speed) parts.push(`${speed.toFixed(1)} t/s`);
  parts.push(`${((end - started) / 1000).toFixed(1)} s`);
  return parts.join(' · ');
}

// Concurrency lanes #########################################################################

// The header that ties a request to its in-flight entry (the server lists it in req_headers).
const RUN_HEADER = 'X-Playground-Run';

// One model's request of a "Send to all". `phase` is where it is now: waiting, queued, loading,
// reasoning, answering, then done, stopped or error; `phases` the steps so far with their
// times (performance.now()), the last one open until the request ends.
function newLane(model, marker) {
  const now = performance.now();
  return {
    model, marker, phase: 'waiting', queuePosition: null,
    phases: [{ name: 'waiting', start: now, end: null, position: null }],
    started: now, firstByte: null, firstContent: null, ended: null,
    loading: '', reasoning: '', content: '', contentChunks: 0, lastContent: null, usage: null, timings: null,
    entry: null, entryHeardAt: -Infinity,  // its in-flight entry as the last event had it, and when
    error: null, final: null, responded: false, controller: null,
  };
}

const ANSWERING = new Set(['reasoning', 'answering']);

// Resolves once no in-flight entry carries one of these markers any more, or after `ms`.
function leftTheServer(markers, ms) {
  const present = (entries) => [...entries.values()].some((e) => markers.includes(headerOf(e.req_headers, RUN_HEADER)));
  if (!present(live.inflight)) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { off(); clearTimeout(timer); resolve(); };
    const off = on('inflight', (entries) => { if (!present(entries)) done(); });
    const timer = setTimeout(done, ms);
  });
}

// A score to sort by: one that is not a number goes last.
function sortable(score) {
  return Number.isFinite(score) ? score : -Infinity;
}

function running(lane) {
  return lane.ended === null;
}

function setPhase(lane, name, position = null) {
  if (!running(lane)) return;
  const last = lane.phases.at(-1);
  if (last?.name === name) {  // the same step; only its place in the queue may have moved
    last.position = position;
    lane.queuePosition = position;
    return;
  }
  const now = performance.now();
  if (last) last.end = now;
  lane.phases.push({ name, start: now, end: null, position });
  lane.phase = name;
  lane.queuePosition = position;
}

function finishLane(lane) {
  if (!running(lane)) return;
  lane.ended = performance.now();
  const last = lane.phases.at(-1);
  if (last) last.end = lane.ended;
  lane.phase = lane.final || 'stopped';
  lane.queuePosition = null;
  lane.controller = null;
}

// Tokens as the server counted them when it says, else the content deltas streamed; speed from
// the server's timings, else measured from the first content token: the deltas after it over
// the time to the last one (a delta is a token as llama-server streams them).
function laneStats(lane) {
  const tokens = lane.usage?.completion_tokens ?? lane.timings?.predicted_n ?? lane.contentChunks;
  const seconds = lane.contentChunks > 1 ? (lane.lastContent - lane.firstContent) / 1000 : 0;
  const speed = lane.timings?.predicted_per_second ?? (seconds > 0 ? (lane.contentChunks - 1) / seconds : null);
  return { tokens, speed };
}

// A header of an in-flight entry, whatever case the server spelled its name in.
function headerOf(headers, name) {
  if (!headers) return undefined;
  if (name in headers) return headers[name];
  const key = Object.keys(headers).find((k) => k.toLowerCase() === name.toLowerCase());
  return key === undefined ? undefined : headers[key];
}
