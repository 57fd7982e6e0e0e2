// Playground page: try a model. Chat streams from /v1/chat/completions (Stop aborts the fetch,
// and the server then cancels the upstream request); reasoning deltas go to a collapsible
// block apart from the answer, and the answer is rendered by markdown.js, which escapes
// everything the model wrote. Image generation, speech and transcription tabs appear only for
// models whose capabilities (/v1/models) say they can do it.
//
// The conversation and settings live at module level, so they survive a visit to another page;
// a reply still streaming when the page is left is stopped.

import { getJSON, request, lineSplitter } from '/ui/api.js';
import { h, field, toast } from '/ui/dom.js';
import { renderMarkdown } from '/ui/markdown.js';

const settings = { model: '', system: '', temperature: '', maxTokens: '', tab: 'chat' };
let conversation = [];  // {role: 'user'|'assistant', content, reasoning, error, meta, stopped}

const TABS = [
  { id: 'chat', label: 'Chat', capability: null },
  { id: 'images', label: 'Images', capability: 'image_generation' },
  { id: 'speech', label: 'Speech', capability: 'audio_speech' },
  { id: 'transcription', label: 'Transcription', capability: 'audio_transcriptions' },
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
  };
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
    h('div', { class: 'toolbar' }, field('Model', modelSelect)),
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

// Reads an event stream of chat completion chunks and hands each JSON payload to onChunk.
async function readServerSentEvents(response, onChunk) {
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
