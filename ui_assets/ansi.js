// ANSI escape sequences in model output (llama-server, vLLM and friends colour their logs).
// Only SGR colour codes are rendered: 30-37 and 90-97 (foreground), 1 (bold), 22 (not bold),
// 39 (default colour) and 0 / empty (reset). Every other escape sequence is dropped. The result
// is built from text nodes and spans, so log text can never become markup.

// One escape sequence: CSI (ESC [ params final), OSC (ESC ] ... BEL or ESC \), or a two-byte
// ESC sequence. Other C0 control characters except tab are dropped as well.
const ESCAPE = /\x1b\[([0-9;:?]*)[ -\/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?|[\x00-\x08\x0b-\x1f\x7f]/g;

// Colour/bold state carried from one line to the next, as terminals do.
export class AnsiState {
  constructor() {
    this.fg = null;     // 0-15 or null for the default colour
    this.bold = false;
  }

  applySgr(params) {
    const codes = params === '' ? [0] : params.split(/[;:]/).map((p) => (p === '' ? 0 : Number(p)));
    for (let i = 0; i < codes.length; i += 1) {
      const code = codes[i];
      if (code === 0) { this.fg = null; this.bold = false; }
      else if (code === 1) this.bold = true;
      else if (code === 22) this.bold = false;
      else if (code === 39) this.fg = null;
      else if (code >= 30 && code <= 37) this.fg = code - 30;
      else if (code >= 90 && code <= 97) this.fg = code - 90 + 8;
      // 38/48 take extra parameters (5;n or 2;r;g;b): skip them, they are not rendered.
      else if (code === 38 || code === 48) i += codes[i + 1] === 5 ? 2 : codes[i + 1] === 2 ? 4 : 1;
    }
  }

  className() {
    const names = [];
    if (this.fg !== null) names.push(`ansi-fg-${this.fg}`);
    if (this.bold) names.push('ansi-bold');
    return names.join(' ');
  }
}

// Render one piece of text into a DocumentFragment, updating `state` as codes go by.
export function renderAnsi(text, state = new AnsiState()) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  const emit = (piece) => {
    if (!piece) return;
    const className = state.className();
    if (!className) {
      fragment.append(piece);
    } else {
      const span = document.createElement('span');
      span.className = className;
      span.textContent = piece;
      fragment.append(span);
    }
  };
  for (const match of text.matchAll(ESCAPE)) {
    emit(text.slice(last, match.index));
    last = match.index + match[0].length;
    if (match[2] === 'm') state.applySgr(match[1]);
  }
  emit(text.slice(last));
  return fragment;
}

