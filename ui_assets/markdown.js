// A small, safe markdown renderer for model answers in the playground.
//
// Model output is untrusted. Every piece of it is HTML-escaped before it is placed between
// tags this file writes itself, so the only markup in the result is: <p>, <br>, <strong>,
// <em>, <code>, <pre>, <ul>/<ol>/<li>, <h1>-<h3> and <a> whose href is an http(s) URL.
// Supported: paragraphs and line breaks, **bold** / __bold__, *italic* / _italic_, `code`,
// fenced code blocks (``` or ~~~, an unclosed fence runs to the end, as while streaming),
// "- " / "* " / "+ " and "1. " lists (flat), "#" headings and [text](http://...) links.

const ENTITIES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ENTITIES[c]);
}

const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

export function renderMarkdown(source) {
  // NUL is the placeholder marker of inline(): never let the input contain one.
  const lines = source.replace(/\0/g, '').split(/\r?\n/);
  const html = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      for (i += 1; i < lines.length && !lines[i].trim().startsWith(fence[1]); i += 1) body.push(lines[i]);
      i += 1;  // the closing fence
      const lang = fence[2] ? ` class="lang-${escapeHtml(fence[2])}"` : '';
      html.push(`<pre><code${lang}>${escapeHtml(body.join('\n'))}</code></pre>`);
      continue;
    }
    if (!line.trim()) { i += 1; continue; }
    const heading = line.match(HEADING);
    if (heading) {
      const level = Math.min(heading[1].length, 3);
      html.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      i += 1;
      continue;
    }
    const numbered = NUMBERED.test(line);
    if (numbered || BULLET.test(line)) {
      const pattern = numbered ? NUMBERED : BULLET;
      const start = numbered ? Number(line.match(NUMBERED)[1]) : 1;
      const items = [];
      while (i < lines.length && pattern.test(lines[i])) {
        const match = lines[i].match(pattern);
        let text = numbered ? match[2] : match[1];
        // Indented lines that are not items themselves continue the item.
        for (i += 1; i < lines.length && /^\s{2,}\S/.test(lines[i]) && !startsBlock(lines[i]); i += 1) {
          text += `\n${lines[i].trim()}`;
        }
        items.push(`<li>${text.split('\n').map(inline).join('<br>')}</li>`);
      }
      const tag = numbered ? 'ol' : 'ul';
      const startAttr = numbered && start !== 1 ? ` start="${start}"` : '';
      html.push(`<${tag}${startAttr}>${items.join('')}</${tag}>`);
      continue;
    }
    const paragraph = [];
    for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i += 1) paragraph.push(lines[i]);
    html.push(`<p>${paragraph.map(inline).join('<br>')}</p>`);
  }
  return html.join('\n');
}

// Inline formatting of one line. Code spans and links are cut out first and stand in the text
// as \0<n>\0 placeholders, so emphasis never reaches inside them (or inside an href).
function inline(text) {
  const pieces = [];
  const hold = (html) => `\0${pieces.push(html) - 1}\0`;
  let out = text.replace(/`([^`]+)`/g, (_, code) => hold(`<code>${escapeHtml(code)}</code>`));
  out = out.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, url) =>
    hold(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${emphasis(escapeHtml(label))}</a>`));
  out = emphasis(escapeHtml(out));
  // Two passes: a link label may itself hold a code placeholder.
  for (let pass = 0; pass < 2; pass += 1) out = out.replace(/\0(\d+)\0/g, (_, n) => pieces[Number(n)]);
  return out;
}

function emphasis(html) {
  return html
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, '<strong>$1</strong>')
    .replace(/__(?=\S)([\s\S]*?\S)__/g, '<strong>$1</strong>')
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?![*\w])/g, '$1<em>$2</em>')
    .replace(/(^|[^_\w])_(?=[^\s_])([^_]*?[^\s_])_(?![_\w])/g, '$1<em>$2</em>');
}
