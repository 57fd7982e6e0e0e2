// Model page: being written (issue 20).
import { h } from '/ui/dom.js';

export function mount(root) {
  root.append(h('h1', {}, 'Model'));
  return null;
}
