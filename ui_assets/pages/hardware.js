// Hardware page: what GET /api/hardware says this machine is (CPU, memory, GPUs and their
// driver, operating system), looked at once by the server when it started. Every value the
// server could not find out is null: the page says "unknown" (or why) rather than leaving a
// blank, and a part that is missing altogether (no GPU through NVML) says so in words.

import { getJSON, on } from '/ui/api.js';
import { h, replace, fmtBytes, fmtTime } from '/ui/dom.js';

const ENVIRONMENTS = {
  wsl: 'Windows Subsystem for Linux',
  container: 'container',
  virtual_machine: 'virtual machine',
  // The server never claims bare metal: some containers cannot be told from it.
  unknown: 'not detected (bare metal, or a container or VM that does not show)',
};

export function mount(root) {
  let controller = null;

  const about = h('p', { class: 'muted', 'data-testid': 'hw-about' }, 'Loading…');
  const content = h('div', { class: 'hw-grid' });
  const raw = h('pre', { class: 'body' });
  const rawBox = h('details', { class: 'hw-raw', hidden: true }, h('summary', {}, 'The report as JSON (/api/hardware)'), raw);
  root.append(h('h1', {}, 'Hardware'), about, content, rawBox);

  async function refresh() {
    if (controller) controller.abort();
    const current = new AbortController();
    controller = current;
    let report;
    try {
      report = await getJSON('/api/hardware', { signal: current.signal });
    } catch (error) {
      if (current.signal.aborted) return;
      // 503 "hardware detection unavailable": not even the memory size could be read.
      about.replaceChildren(h('span', { class: 'error-text', 'data-testid': 'hw-error' },
        `Hardware report unavailable: ${error.message}`));
      content.replaceChildren();
      rawBox.hidden = true;
      return;
    }
    if (current.signal.aborted) return;
    controller = null;
    show(report || {});
  }

  function show(report) {
    const detector = report.capture?.detector;
    about.textContent = [
      report.captured_at ? `Detected ${fmtTime(report.captured_at)}` : 'Detected',
      detector ? `by ${detector.name} ${detector.version}` : null,
      'when the server started',
    ].filter(Boolean).join(' ');
    replace(content,
      cpuPanel(report.cpu),
      memoryPanel(report.memory),
      systemPanel(report),
      gpuPanel(report.accelerators),
      driverPanel(report.accelerators));
    raw.textContent = JSON.stringify(report, null, 2);
    rawBox.hidden = false;
  }

  refresh();
  // The server may have restarted, on other hardware or with a driver upgraded.
  const offs = [on('reconnected', refresh)];
  return () => {
    if (controller) controller.abort();
    offs.forEach((off) => off());
  };
}

// Panels ##################################################################################

function cpuPanel(cpu) {
  if (!cpu) return panel('CPU', 'hw-cpu', unavailable('The server did not report the CPU.'));
  return panel('CPU', 'hw-cpu', facts([
    ['Model', cpu.model],
    ['Vendor', cpu.vendor],
    ['Sockets', cpu.socket_count],
    ['Physical cores', cpu.physical_core_count],
    ['Logical threads', cpu.logical_thread_count],
  ]));
}

function memoryPanel(memory) {
  const bytes = memory?.capacity_bytes;
  return panel('Memory', 'hw-memory',
    facts([['Capacity', typeof bytes === 'number' ? `${fmtBytes(bytes)} (${bytes.toLocaleString()} bytes)` : null]]),
    h('p', { class: 'muted hw-note' }, 'What this server may use: the physical memory, or a smaller container (cgroup) limit.'));
}

function gpuPanel(accelerators) {
  const gpus = accelerators || [];
  if (!gpus.length) {
    return panel('GPUs', 'hw-gpus', unavailable('No GPU found. Only NVIDIA GPUs are listed, through NVML '
      + '(the driver\'s library): there is no NVIDIA GPU, or its driver or NVML cannot be loaded.'));
  }
  return panel('GPUs', 'hw-gpus', gpus.map((gpu) => h('div', { class: 'hw-gpu', 'data-testid': `hw-gpu-${gpu.index}` },
    h('h3', {}, `GPU ${gpu.index}`),
    facts([
      ['Model', gpuModel(gpu)],
      ['Architecture', gpu.architecture],
      ['Memory', gpuMemory(gpu.memory)],
      ['Driver', driverText(gpu.driver)],
      ['Power limit', typeof gpu.power_limit_watts === 'number' ? `${gpu.power_limit_watts} W` : null],
    ]))));
}

// The drivers of all GPUs (one, as a rule); the server reports no CUDA version.
function driverPanel(accelerators) {
  const drivers = [...new Set((accelerators || []).map((gpu) => driverText(gpu.driver)).filter(Boolean))];
  return panel('Drivers', 'hw-drivers', facts([
    ['GPU driver', drivers.length ? drivers.join(', ') : h('span', { class: 'muted' }, 'none found (no NVIDIA GPU or NVML)')],
    ['CUDA version', h('span', { class: 'muted' }, 'not reported by the server')],
  ]));
}

function systemPanel(report) {
  const os = report.operating_system || {};
  const arch = report.architecture || {};
  const environment = report.environment || {};
  const family = os.family === 'other' ? `other (${os.raw_family})` : os.family;
  const described = ENVIRONMENTS[environment.kind] || environment.kind;
  return panel('Operating system', 'hw-os', facts([
    ['Name', [os.name, os.version].filter(Boolean).join(' ') || null],
    ['Family', family],
    ['Kernel', os.kernel],
    ['Architecture', arch.name ? `${arch.name}${arch.raw_name ? ` (${arch.raw_name})` : ''}` : null],
    ['Runs in', environment.name ? `${environment.name} (${described})` : described],
  ]));
}

// Pieces ##################################################################################

function panel(title, testid, ...children) {
  return h('section', { class: 'panel hw-panel', 'data-testid': testid }, h('h2', {}, title), children);
}

// A list of label/value pairs; a value the server could not find out (null) reads "unknown".
function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.map(([label, value]) => [
    h('dt', {}, label),
    h('dd', {}, value === null || value === undefined || value === ''
      ? h('span', { class: 'muted' }, 'unknown') : value),
  ]));
}

function unavailable(text) {
  return h('p', { class: 'empty' }, text);
}

// NVML's names carry the vendor already ("NVIDIA H100 80GB HBM3"): it is not said twice.
function gpuModel(gpu) {
  if (!gpu.model) return gpu.vendor ? `${gpu.vendor} (model unknown)` : null;
  return !gpu.vendor || gpu.model.toLowerCase().startsWith(gpu.vendor.toLowerCase()) ? gpu.model : `${gpu.vendor} ${gpu.model}`;
}

function gpuMemory(memory) {
  if (!memory) return null;
  if (typeof memory.capacity_bytes === 'number') {
    return `${fmtBytes(memory.capacity_bytes)}${memory.kind ? ` (${memory.kind})` : ''}`;
  }
  // Unified-memory boards (GB10, Jetson) report no memory of their own.
  return `${memory.kind ? `${memory.kind}, ` : ''}size not reported (as on unified-memory boards)`;
}

function driverText(driver) {
  if (!driver) return null;
  return [driver.name, driver.version].filter(Boolean).join(' ') || null;
}
