// Captures page: a recorded request and its answer (/api/captures/<id>, the ID of the activity
// row). Headers as tables; bodies decoded from base64, JSON pretty-printed, event streams
// listed event by event, binary bodies offered as a download. Without an ID the page lists
// the recent requests that have a capture.

import { getJSON } from '/ui/api.js';
import { h, field, navigate, fmtBytes, fmtTime } from '/ui/dom.js';

const RECENT = 50;

export function mount(root, { rest }) {
  const page = new AbortController();
  const objectUrls = [];  // download links for binary bodies, revoked when the page goes

  const idInput = h('input', { type: 'text', inputmode: 'numeric', 'data-testid': 'capture-id', value: rest, size: 8 });
  const open = h('button', { type: 'submit', class: 'primary', 'data-testid': 'capture-open' }, 'Open');
  const form = h('form', { class: 'toolbar' }, field('Capture ID (the activity row ID)', idInput), open);
  const content = h('div');
  root.append(h('h1', {}, 'Captures'), form, content);

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const id = idInput.value.trim();
    if (id) navigate(`/ui/captures/${encodeURIComponent(id)}`);
  });

  if (rest) showCapture(rest);
  else showRecent();

  // Recent captured requests ##############################################################

  async function showRecent() {
    content.replaceChildren(h('p', { class: 'muted' }, 'Loading recent requests…'));
    let rows;
    try {
      rows = (await getJSON(`/api/metrics/activity?limit=${RECENT}`, { signal: page.signal })).data;
    } catch (error) {
      if (error.name !== 'AbortError') content.replaceChildren(h('p', { class: 'error-text' }, error.message));
      return;
    }
    const captured = rows.filter((row) => row.has_capture);
    content.replaceChildren(
      h('h2', {}, 'Recent requests with a capture'),
      captured.length
        ? h('ul', { 'data-testid': 'capture-recent' }, captured.map((row) => h('li', {},
          h('a', { href: `/ui/captures/${row.id}`, 'data-testid': `capture-link-${row.id}` }, `#${row.id}`),
          ` ${row.model} ${row.req_path} → ${row.resp_status_code} `,
          h('span', { class: 'muted' }, fmtTime(row.timestamp)))))
        : h('p', { class: 'empty' }, 'None yet: captures are kept for recent requests while captureBuffer is above 0.'));
  }

  // One capture ###########################################################################

  async function showCapture(id) {
    content.replaceChildren(h('p', { class: 'muted' }, `Loading capture ${id}…`));
    let capture;
    try {
      capture = await getJSON(`/api/captures/${encodeURIComponent(id)}`, { signal: page.signal });
    } catch (error) {
      if (error.name !== 'AbortError') {
        content.replaceChildren(h('p', { class: 'error-text', 'data-testid': 'capture-error' }, `Capture ${id}: ${error.message}`));
      }
      return;
    }
    const summary = h('p', { class: 'muted' });
    content.replaceChildren(
      summary,
      h('section', { class: 'panel capture-part', 'data-testid': 'capture-request' },
        h('h2', {}, 'Request ', h('span', { class: 'mono' }, capture.req_path)),
        headersTable(capture.req_headers),
        bodyView(capture.req_body, capture.req_headers)),
      h('section', { class: 'panel capture-part', 'data-testid': 'capture-response' },
        h('h2', {}, 'Response'),
        headersTable(capture.resp_headers),
        bodyView(capture.resp_body, capture.resp_headers)));
    describeRow(capture.id, summary);
  }

  // The activity row of the capture says which model answered, how and when.
  async function describeRow(id, target) {
    try {
      const row = (await getJSON(`/api/metrics/activity?min_id=${id}&max_id=${id}`, { signal: page.signal })).data[0];
      if (row) target.textContent = `#${row.id} · ${row.model} · status ${row.resp_status_code} · ${fmtTime(row.timestamp)}`;
    } catch { /* the row may be pruned while its capture is still cached */ }
  }

  function headersTable(headers) {
    const entries = Object.entries(headers || {}).sort(([a], [b]) => a.localeCompare(b));
    if (!entries.length) return h('p', { class: 'muted' }, 'No headers captured.');
    return h('div', { class: 'table-wrap' }, h('table', { class: 'headers' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Header'), h('th', {}, 'Value'))),
      h('tbody', {}, entries.map(([name, value]) => h('tr', {}, h('td', {}, name), h('td', {}, String(value)))))));
  }

  function bodyView(base64, headers) {
    if (base64 === null || base64 === undefined) {
      return h('p', { class: 'muted' }, 'Body not captured (never for some routes and for error answers).');
    }
    const bytes = decodeBase64(base64);
    const type = headerValue(headers, 'content-type');
    let text;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
      const url = URL.createObjectURL(new Blob([bytes], { type: type || 'application/octet-stream' }));
      objectUrls.push(url);
      return h('p', {}, `Binary body, ${fmtBytes(bytes.length)} `, h('a', { href: url, download: 'body' }, 'download'));
    }
    if (type.includes('text/event-stream') || /^(data|event):/.test(text)) return eventsView(text);
    return h('pre', { class: 'body' }, prettyJson(text) ?? text);
  }

  return () => {
    page.abort();
    objectUrls.forEach((url) => URL.revokeObjectURL(url));
  };
}

// An event stream, one block per event (events end at a blank line), JSON data pretty-printed.
function eventsView(text) {
  const events = text.split(/\r?\n\r?\n/).map((block) => block.trim()).filter(Boolean);
  return h('div', { 'data-testid': 'capture-events' }, h('p', { class: 'muted' }, `${events.length} events`),
    events.map((block, i) => {
      const name = (block.match(/^event:\s?(.*)$/m) || [])[1];
      const data = block.split(/\r?\n/).filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, '')).join('\n');
      const shown = data ? prettyJson(data) ?? data : block;
      return h('div', { class: 'sse-event' },
        h('div', { class: 'muted' }, `event ${i + 1}${name ? ` · ${name}` : ''}`),
        h('pre', { class: 'body' }, shown));
    }));
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return null;
  }
}

function decodeBase64(base64) {
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function headerValue(headers, name) {
  const key = Object.keys(headers || {}).find((k) => k.toLowerCase() === name);
  return key ? String(headers[key]).toLowerCase() : '';
}
