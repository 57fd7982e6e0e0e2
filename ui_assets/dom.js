// Small helpers every page uses: building elements, formatting numbers and times, toasts and
// in-app navigation. Text always goes in as text nodes, so nothing here can inject markup.

import { prefs } from '/ui/prefs.js';

// Properties set as DOM properties rather than attributes (they reflect live state).
const PROPERTIES = new Set(['value', 'checked', 'disabled', 'hidden', 'selected', 'open', 'multiple']);

// h('button', {class: 'primary', onclick: fn, 'data-testid': 'x'}, 'Label', child, [more])
// Attribute values null/undefined/false are left out; children may be strings, nodes, arrays
// or null (skipped).
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      element.addEventListener(name.slice(2), value);
    } else if (PROPERTIES.has(name)) {
      element[name] = value;
    } else {
      element.setAttribute(name, value === true ? '' : String(value));
    }
  }
  append(element, children);
  return element;
}

export function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : String(child));
  }
  return parent;
}

// replaceChildren that takes the same children as h() (arrays, null).
export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

// A labelled form control: <div class="field"><label for=id>text</label>control</div>.
export function field(labelText, control, className = 'field') {
  if (!control.id) control.id = `f-${Math.random().toString(36).slice(2, 9)}`;
  return h('div', { class: className }, h('label', { for: control.id }, labelText), control);
}

// Navigation ##############################################################################

// Change the page without reloading: app.js re-renders on popstate.
export function navigate(path) {
  if (path !== location.pathname + location.search) history.pushState(null, '', path);
  window.dispatchEvent(new PopStateEvent('popstate'));
}

// Toasts ##################################################################################

const TOAST_MS = 10000;

export function toast(message, kind = 'error') {
  const box = document.getElementById('toasts');
  const close = h('button', { type: 'button', class: 'small', 'aria-label': 'Dismiss' }, '×');
  const item = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    h('p', {}, message), close);
  close.addEventListener('click', () => item.remove());
  box.append(item);
  setTimeout(() => item.remove(), TOAST_MS);
}

// Formatting ##############################################################################

const DASH = '—';

// Token counts: the server writes -1 for "unknown".
export function fmtCount(value) {
  return typeof value === 'number' && value >= 0 ? value.toLocaleString() : DASH;
}

// Speeds in tokens per second: 0 or -1 mean "not measured".
export function fmtSpeed(value) {
  return typeof value === 'number' && value > 0 ? value.toFixed(1) : DASH;
}

export function fmtMs(ms) {
  if (typeof ms !== 'number' || ms < 0) return DASH;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return fmtSeconds(ms / 1000);
}

export function fmtSeconds(seconds) {
  if (typeof seconds !== 'number' || !isFinite(seconds)) return DASH;
  seconds = Math.max(0, seconds);
  if (seconds < 60) return seconds < 10 ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m ${String(Math.floor(seconds % 60)).padStart(2, '0')}s`;
  return `${Math.floor(minutes / 60)}h ${String(minutes % 60).padStart(2, '0')}m`;
}

export function fmtBytes(bytes) {
  if (typeof bytes !== 'number' || bytes < 0) return DASH;
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let unit = 0;
  while (bytes >= 1024 && unit < units.length - 1) { bytes /= 1024; unit += 1; }
  return unit === 0 ? `${bytes} B` : `${bytes.toFixed(1)} ${units[unit]}`;
}

// Times follow the time format chosen on the settings page (prefs.js): the browser's
// locale, its locale with a 24-hour or 12-hour clock, or ISO 8601 (local time,
// "2026-01-05 15:04:05"). fmtTime gives the date and time, fmtClock the time of day.
// `timestamp` is anything Date takes: milliseconds, an RFC 3339 string, a Date.
const HOUR_CYCLES = { '24h': 'h23', '12h': 'h12' };
const DATE_PARTS = { year: 'numeric', month: 'numeric', day: 'numeric' };
const CLOCK_PARTS = { hour: 'numeric', minute: '2-digit', second: '2-digit' };

function asDate(timestamp) {
  const date = timestamp instanceof Date ? timestamp : new Date(timestamp);
  return isNaN(date) ? null : date;
}

const pad = (n) => String(n).padStart(2, '0');

function isoDate(date) {
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
}

function isoClock(date) {
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

export function fmtTime(timestamp, format = prefs.get().timeFormat) {
  const date = asDate(timestamp);
  if (!date) return String(timestamp);
  if (format === 'iso') return `${isoDate(date)} ${isoClock(date)}`;
  const hourCycle = HOUR_CYCLES[format];
  return hourCycle ? date.toLocaleString(undefined, { ...DATE_PARTS, ...CLOCK_PARTS, hourCycle }) : date.toLocaleString();
}

export function fmtClock(timestamp, format = prefs.get().timeFormat) {
  const date = asDate(timestamp);
  if (!date) return String(timestamp);
  if (format === 'iso') return isoClock(date);
  const hourCycle = HOUR_CYCLES[format];
  return hourCycle ? date.toLocaleTimeString(undefined, { ...CLOCK_PARTS, hourCycle }) : date.toLocaleTimeString();
}

// Coalesce bursts of calls (events) into one call of fn at the end of a window of `ms`:
// the first call opens the window, later calls in it change nothing. Unlike a debounce, a
// steady stream of events still gets a call every `ms`.
export function coalesce(fn, ms) {
  let timer = null;
  const coalesced = () => {
    if (timer !== null) return;
    timer = setTimeout(() => { timer = null; fn(); }, ms);
  };
  coalesced.cancel = () => { clearTimeout(timer); timer = null; };
  return coalesced;
}
