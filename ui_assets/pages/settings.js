// Settings page: the UI's own preferences (prefs.js), kept in this browser: theme, time
// format, rows per page on the activity page, lines kept on the logs page. A change is saved
// and applied at once (no reload, no Save button); "Reset to defaults" forgets them. The
// controls follow changes made elsewhere (the activity page's rows per page, another tab).

import { h, field, fmtTime, fmtCount } from '/ui/dom.js';
import { prefs, CHOICES, DEFAULTS } from '/ui/prefs.js';

const THEME_LABELS = { system: 'Same as the system', light: 'Light', dark: 'Dark' };
const TIME_LABELS = { locale: "Browser's locale", '24h': '24-hour clock', '12h': '12-hour clock', iso: 'ISO 8601' };

export function mount(root) {
  const theme = h('select', { 'data-testid': 'settings-theme' },
    CHOICES.theme.map((value) => h('option', { value }, THEME_LABELS[value])));
  const timeFormat = h('select', { 'data-testid': 'settings-time-format' });
  const activityRows = h('select', { 'data-testid': 'settings-activity-rows' },
    CHOICES.activityPageSize.map((value) => h('option', { value }, String(value))));
  const logLines = h('select', { 'data-testid': 'settings-log-lines' },
    CHOICES.logLines.map((value) => h('option', { value }, fmtCount(value))));
  const reset = h('button', { type: 'button', 'data-testid': 'settings-reset' }, 'Reset to defaults');
  const saved = h('p', { class: 'muted settings-saved', role: 'status', 'data-testid': 'settings-status' });
  const problem = h('p', { class: 'error-text', hidden: true, 'data-testid': 'settings-problem' });

  const hint = (text) => h('p', { class: 'settings-hint muted' }, text);
  root.append(
    h('h1', {}, 'Settings'),
    h('p', { class: 'muted' }, 'How this web UI looks and behaves. Kept in this browser only (not on the server); ' +
      'a change applies at once.'),
    problem,
    h('form', { class: 'panel settings-form', 'data-testid': 'settings-form', onsubmit: (e) => e.preventDefault() },
      h('div', {}, field('Theme', theme), hint('"Same as the system" follows the light or dark setting of your system.')),
      h('div', {}, field('Time format', timeFormat), hint('For the times on the activity and logs pages.')),
      h('div', {}, field('Rows per page (activity)', activityRows),
        hint('Requests shown at a time on the activity page.')),
      h('div', {}, field('Log lines kept (logs)', logLines),
        hint('The logs page drops its oldest lines past this many; more lines take more memory.')),
      h('div', { class: 'settings-actions' }, reset, saved)));

  // Each format's option shows how a time reads in it: now, in this browser's locale.
  function renderTimeOptions() {
    const now = Date.now();
    timeFormat.replaceChildren(...CHOICES.timeFormat.map((value) =>
      h('option', { value }, `${TIME_LABELS[value]} (${fmtTime(now, value)})`)));
  }

  function show(current) {
    renderTimeOptions();
    theme.value = current.theme;
    timeFormat.value = current.timeFormat;
    activityRows.value = String(current.activityPageSize);
    logLines.value = String(current.logLines);
    // Nothing to reset, unless an unreadable value is still stored.
    reset.disabled = problem.hidden && Object.keys(DEFAULTS).every((name) => current[name] === DEFAULTS[name]);
  }

  const problemText = prefs.loadProblem();
  problem.textContent = problemText;
  problem.hidden = !problemText;

  const change = (patch) => {
    problem.hidden = true;
    prefs.set(patch);
    saved.textContent = 'Saved in this browser.';
  };
  theme.addEventListener('change', () => change({ theme: theme.value }));
  timeFormat.addEventListener('change', () => change({ timeFormat: timeFormat.value }));
  activityRows.addEventListener('change', () => change({ activityPageSize: Number(activityRows.value) }));
  logLines.addEventListener('change', () => change({ logLines: Number(logLines.value) }));
  reset.addEventListener('click', () => {
    problem.hidden = true;
    prefs.reset();
    saved.textContent = 'Back to the defaults.';
  });

  show(prefs.get());
  const off = prefs.onChange(show);
  return off;
}
