// The server, as the pages see it: HTTP helpers that turn llama-swap's error envelope into an
// Error with a readable message, a reader for the plain-text log streams, and the live event
// stream (/api/events) as a small publish/subscribe hub with the latest state kept in `live`.
//
// Topics published by `on(topic, fn)`:
//   modelStatus    array of model status objects (local models, then peers)
//   inflight       Map id -> in-flight entry, after each snapshot/upsert/remove was applied
//   activity       {id} of a newly recorded activity row
//   swap           a swap record (as GET /api/swaps has them), when decided and when done
//   timeline       a timeline entry (as GET /api/timeline has them); one with a known id replaces it
//   kvCache        {model, action, slot, tokens, bytes, ms} of a KV cache save or restore
//   profileChanged {active: name|null}
//   connection     'connecting' | 'connected' | 'reconnecting' | 'offline'
//   reconnected    (no data) the stream is back after a loss: re-fetch what you show
//   authProblem    a message when the server refuses the event stream (401/403)

// HTTP ####################################################################################

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

// fetch with same-origin credentials (the browser's Basic login travels with it); resolves to
// the Response when it is 2xx, else throws ApiError. `json` is sent as a JSON body. Reads say
// they are the UI's (X-Llama-Swap-UI), so the proxy logs its polling at debug, not info.
export async function request(path, { method = 'GET', json, body, headers = {}, signal } = {}) {
  const ours = method === 'GET' ? { 'X-Llama-Swap-UI': '1' } : {};
  const init = { method, headers: { ...ours, ...headers }, signal, credentials: 'same-origin' };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers['Content-Type'] = 'application/json';
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(`Cannot reach llama-swap (${error.message}).`, 0);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

export async function postJSON(path, json, options = {}) {
  const response = await request(path, { ...options, method: 'POST', json });
  const text = await response.text();
  try { return JSON.parse(text); } catch { return text; }
}

// The message a user should see for a failed response: the envelope's error.message when
// there is one, the body text otherwise, with a hint for the two auth statuses.
async function errorFrom(response) {
  let text = '';
  try { text = await response.text(); } catch { /* body unreadable: use the status line */ }
  let message = text.trim() || `${response.status} ${response.statusText}`;
  try {
    const body = JSON.parse(text);
    if (typeof body?.error?.message === 'string') message = body.error.message;
    else if (typeof body?.error === 'string') message = body.error;
  } catch { /* not JSON: keep the text */ }
  if (response.status === 401) {
    message = `Not signed in (401): ${message}. Reload the page and sign in with an API key as the password.`;
  } else if (response.status === 403) {
    message = `Not allowed (403): ${message}. This action needs an admin key (adminKeys).`;
  }
  return new ApiError(message, response.status);
}

// A model ID in a URL path: IDs may contain '/' (kept, the server matches the rest of the
// path) and characters such as ':' or '#' (escaped per segment).
export function modelPath(id) {
  return id.split('/').map(encodeURIComponent).join('/');
}

// Streams #################################################################################

// Read a plain-text streaming response (GET /logs/stream/...) chunk by chunk until it ends or
// `signal` aborts it. onOpen (optional) runs once the server has answered 200. Resolves when
// the server ends the stream.
export async function streamText(path, { signal, onText, onOpen }) {
  const response = await request(path, { signal });
  if (onOpen) onOpen();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(value);
  }
}

// Turn chunks of text into whole lines: feed(chunk) calls onLine for each finished line and
// keeps the unfinished rest; flush() hands that rest over too. A lone \r (progress bars)
// counts as a line end so overwritten lines do not pile up into one.
export function lineSplitter(onLine) {
  let rest = '';
  const feed = (chunk) => {
    const parts = (rest + chunk).split(/\r\n|\n|\r(?!$)/);
    rest = parts.pop();
    for (const line of parts) onLine(line);
  };
  feed.flush = () => {
    if (rest) onLine(rest.replace(/\r$/, ''));
    rest = '';
  };
  return feed;
}

// Event stream ############################################################################

export const live = {
  models: null,          // latest modelStatus array (null until the first one)
  inflight: new Map(),   // id -> in-flight entry
  profile: null,         // active profile name or null
  connection: 'connecting',
};

const subscribers = new Map();

export function on(topic, fn) {
  if (!subscribers.has(topic)) subscribers.set(topic, new Set());
  subscribers.get(topic).add(fn);
  return () => subscribers.get(topic).delete(fn);
}

function publish(topic, data) {
  for (const fn of subscribers.get(topic) || []) {
    try { fn(data); } catch (error) { console.error(`subscriber of ${topic} failed`, error); }
  }
}

// While EventSource retries by itself we say "reconnecting"; after this long without success
// (server down, not just restarting) we say "offline", and keep trying.
const OFFLINE_AFTER_MS = 10000;
// When the browser gives up (HTTP error, wrong content type) we start a new EventSource.
const RETRY_MS = 3000;

let source = null;
let lostSince = null;     // time the stream was lost, null while connected
let everConnected = false;
let retryTimer = null;

function setConnection(state) {
  if (live.connection === state) return;
  live.connection = state;
  publish('connection', state);
}

export function connectEvents() {
  clearTimeout(retryTimer);
  if (source) source.close();
  source = new EventSource('/api/events');
  source.onopen = () => {
    const wasLost = everConnected && lostSince !== null;
    everConnected = true;
    lostSince = null;
    setConnection('connected');
    if (wasLost) publish('reconnected');
  };
  source.onmessage = (event) => handleMessage(event.data);
  source.onerror = () => {
    if (lostSince === null) lostSince = Date.now();
    if (source.readyState === EventSource.CLOSED) {
      // The browser will not retry (e.g. 401/403/502): find out why, then try again later.
      setConnection('offline');
      explainRefusal();
      retryTimer = setTimeout(connectEvents, RETRY_MS);
    } else {
      setConnection(Date.now() - lostSince > OFFLINE_AFTER_MS ? 'offline' : 'reconnecting');
    }
  };
}

window.addEventListener('offline', () => setConnection('offline'));
window.addEventListener('online', () => connectEvents());

// EventSource does not expose the status of a refused connection: ask again with fetch and
// stop reading as soon as the headers are in.
async function explainRefusal() {
  const controller = new AbortController();
  try {
    const response = await fetch('/api/events', { signal: controller.signal, credentials: 'same-origin' });
    controller.abort();
    if (response.status === 401 || response.status === 403) {
      publish('authProblem', (await errorFrom(response)).message);
    }
  } catch { /* the server is down: the indicator already says offline */ }
}

// Every message is {"type": ..., "data": "<JSON text>"}: the payload is encoded twice.
function handleMessage(text) {
  let type, data;
  try {
    const message = JSON.parse(text);
    type = message.type;
    data = typeof message.data === 'string' ? JSON.parse(message.data) : message.data;
  } catch (error) {
    console.warn('unreadable event', text, error);
    return;
  }
  switch (type) {
    case 'modelStatus':
      live.models = Array.isArray(data) ? data : [];
      publish('modelStatus', live.models);
      break;
    case 'inflight':
      applyInflight(data);
      publish('inflight', live.inflight);
      break;
    case 'profileChanged':
      live.profile = data.active ?? null;
      publish('profileChanged', data);
      break;
    case 'activity':
      publish('activity', data);
      break;
    case 'swap':
    case 'timeline':
    case 'kvCache':
      publish(type, data);
      break;
    default:
      break;  // logData, uiConfig and newer types: no page shows them from here
  }
}

function applyInflight(event) {
  if (event.operation === 'snapshot') {
    live.inflight = new Map((event.requests || []).map((entry) => [entry.id, entry]));
  } else if (event.operation === 'upsert' && event.request) {
    live.inflight.set(event.request.id, event.request);
  } else if (event.operation === 'remove') {
    live.inflight.delete(event.id);
  }
}
