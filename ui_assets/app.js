// The frame around the pages: picks the page from the address (client-side routing with
// history.pushState), keeps the nav and the connection indicator up to date, and starts the
// event stream. A page is a module in /ui/pages/ exporting mount(root, params), which builds
// the page into `root` and returns a function that stops everything it started; params are
// {rest: the path after the page name, query: URLSearchParams}.

// First: the chosen theme goes on <html> (applyTheme, below) before any page is built.
import { applyTheme } from '/ui/prefs.js';
import { connectEvents, on, live } from '/ui/api.js';
import { navigate } from '/ui/dom.js';
// Every page is imported up front (they are small): a page module fetched later, after the
// server was upgraded under an open tab, could not match the shared modules already loaded.
import * as models from '/ui/pages/models.js';
import * as logs from '/ui/pages/logs.js';
import * as activity from '/ui/pages/activity.js';
import * as playground from '/ui/pages/playground.js';
import * as captures from '/ui/pages/captures.js';
import * as performancePage from '/ui/pages/performance.js';  // not `performance`: the browser's global
import * as hardware from '/ui/pages/hardware.js';
import * as modelPage from '/ui/pages/model.js';
import * as timeline from '/ui/pages/timeline.js';
import * as settingsPage from '/ui/pages/settings.js';

applyTheme();

const PAGES = {
  models: { module: models, title: 'Models' },
  logs: { module: logs, title: 'Logs' },
  activity: { module: activity, title: 'Activity' },
  playground: { module: playground, title: 'Playground' },
  captures: { module: captures, title: 'Captures' },
  performance: { module: performancePage, title: 'Performance' },
  hardware: { module: hardware, title: 'Hardware' },
  timeline: { module: timeline, title: 'Timeline' },
  settings: { module: settingsPage, title: 'Settings' },
  model: { module: modelPage, title: 'Model', nav: 'models' },  // /ui/model/<id>, from the models page
};

const view = document.getElementById('view');
const nav = document.getElementById('nav');
const navToggle = document.getElementById('nav-toggle');

// /ui/ and /ui/models -> models; /ui/captures/42 -> captures with rest "42".
function route(pathname) {
  const parts = pathname.replace(/^\/ui\/?/, '').split('/');
  const name = parts[0] || 'models';
  let rest = parts.slice(1).join('/');
  try { rest = decodeURIComponent(rest); } catch { /* malformed escape: keep it as typed */ }
  return { name, rest };
}

let unmount = null;

function render() {
  const { name, rest } = route(location.pathname);
  const page = PAGES[name];

  if (unmount) { unmount(); unmount = null; }
  view.replaceChildren();
  for (const link of nav.querySelectorAll('a')) {
    if (link.dataset.page === (page?.nav || name)) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }

  if (!page) {
    document.title = 'Not found · llama-swap';
    view.innerHTML = '<h1>Page not found</h1><p><a href="/ui/models">Go to the models</a></p>';
    return;
  }
  document.title = `${page.title} · llama-swap`;
  const params = { rest, query: new URLSearchParams(location.search) };
  unmount = page.module.mount(view, params) || null;
}

// Same-origin links into the UI change the page in place; modified clicks (new tab) and
// links elsewhere keep their normal behaviour.
document.addEventListener('click', (event) => {
  const link = event.target.closest('a[href]');
  if (!link || event.defaultPrevented || event.button !== 0) return;
  if (link.getAttribute('href').startsWith('#') || link.hasAttribute('download')) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey || link.target) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith('/ui')) return;
  event.preventDefault();
  closeNav();
  navigate(url.pathname + url.search);
  view.focus({ preventScroll: true });
});

window.addEventListener('popstate', render);

// Narrow screens: the nav opens from the Menu button.
function closeNav() {
  nav.classList.remove('open');
  navToggle.setAttribute('aria-expanded', 'false');
}
navToggle.addEventListener('click', () => {
  const open = !nav.classList.contains('open');
  nav.classList.toggle('open', open);
  navToggle.setAttribute('aria-expanded', String(open));
});

// Connection indicator: its text is the state (tests read it).
const indicator = document.getElementById('connection-state');
const banner = document.getElementById('banner');
function showConnection(state) {
  indicator.textContent = state;
  indicator.parentElement.dataset.state = state;
  if (state === 'connected') banner.hidden = true;
}
on('connection', showConnection);
on('authProblem', (message) => {
  banner.textContent = message;
  banner.hidden = false;
});

showConnection(live.connection);
connectEvents();
render();
