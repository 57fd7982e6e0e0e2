// The UI's own preferences, kept in this browser (localStorage, one JSON value under KEY):
// theme, time format, rows per page on the activity page and lines kept on the logs page.
// What is read back is checked field by field; a field that is missing or not one of its
// choices takes its default, and a value that is not JSON at all gives the defaults (the
// settings page says so). Pages read prefs.get() and follow prefs.onChange(fn); a change in
// another tab arrives through the `storage` event.
//
// app.js calls applyTheme() before the first render: the theme is the `data-theme`
// attribute on <html> (absent for "system", where style.css follows the browser's
// prefers-color-scheme), and <meta name="color-scheme"> says the same to the browser's own
// parts (scroll bars, form controls).

const KEY = 'llama-swap-ui.prefs';

export const CHOICES = {
  theme: ['system', 'light', 'dark'],
  timeFormat: ['locale', '24h', '12h', 'iso'],
  activityPageSize: [10, 25, 50, 100],
  logLines: [1000, 2000, 5000, 10000, 20000, 50000],
};

export const DEFAULTS = Object.freeze({
  theme: 'system',
  timeFormat: 'locale',
  activityPageSize: 25,
  logLines: 5000,
});

const listeners = new Set();
let current = null;   // the checked preferences, read once and kept
let problem = '';     // why the stored value was not used, if it was not

// Only known fields with one of their choices; everything else is dropped.
function validate(raw) {
  const out = { ...DEFAULTS };
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) return out;
  for (const [name, choices] of Object.entries(CHOICES)) {
    if (choices.includes(raw[name])) out[name] = raw[name];
  }
  return out;
}

function storage() {
  try {
    return window.localStorage;  // throws where storage is blocked
  } catch {
    return null;
  }
}

function load() {
  problem = '';
  let text = null;
  try {
    text = storage()?.getItem(KEY) ?? null;
  } catch {
    text = null;
  }
  if (text === null) return { ...DEFAULTS };
  let raw;
  try {
    raw = JSON.parse(text);
  } catch {
    problem = 'The saved settings could not be read; the defaults are used until you change one.';
    return { ...DEFAULTS };
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) {
    problem = 'The saved settings were not settings; the defaults are used until you change one.';
  }
  return validate(raw);
}

function save() {
  try {
    storage()?.setItem(KEY, JSON.stringify(current));
  } catch {
    // Full or blocked: the choice holds for this page only.
  }
}

function notify(before) {
  applyTheme();
  for (const fn of [...listeners]) {
    try {
      fn(get(), before);
    } catch (error) {
      console.error('a preferences listener failed', error);
    }
  }
}

export function get() {
  if (!current) current = load();
  return { ...current };
}

// Why the stored value was not used ('' when it was, or when there was none).
export function loadProblem() {
  get();
  return problem;
}

// Changes the named fields (others stay); an invalid value is ignored.
export function set(patch) {
  const before = get();
  current = validate({ ...before, ...patch });
  problem = '';
  save();
  if (Object.keys(current).some((name) => current[name] !== before[name])) notify(before);
  return get();
}

export function reset() {
  const before = get();
  current = { ...DEFAULTS };
  problem = '';
  try {
    storage()?.removeItem(KEY);
  } catch {
    // blocked: nothing was stored either
  }
  notify(before);
  return get();
}

// fn(prefs, before) after every change; returns the function that stops it.
export function onChange(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

// The theme on <html>: data-theme="light"|"dark" for an explicit choice, none for "system".
export function applyTheme() {
  const { theme } = get();
  const root = document.documentElement;
  if (theme === 'system') delete root.dataset.theme;
  else root.dataset.theme = theme;
  let meta = document.querySelector('meta[name="color-scheme"]');
  if (!meta) {
    meta = document.createElement('meta');
    meta.name = 'color-scheme';
    document.head.append(meta);
  }
  meta.content = theme === 'system' ? 'light dark' : theme;
}

// Another tab changed (or cleared) them: read them again.
window.addEventListener('storage', (event) => {
  if (event.key !== KEY && event.key !== null) return;
  const before = get();
  current = load();
  notify(before);
});

export const prefs = { get, set, reset, onChange, applyTheme, loadProblem, CHOICES, DEFAULTS };
