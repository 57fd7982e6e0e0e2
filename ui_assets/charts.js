// What the UI's uPlot charts share: a chart as wide as the box it sits in, following the box
// when the window (or the nav opening on a phone) resizes it.

// A few pixels narrower than its box, so that rounding never makes the box wider than its column.
export function chartWidth(box) {
  return Math.max(200, Math.floor(box.clientWidth) - 2);
}

// Charts of `height` kept as wide as their boxes: after boxes change size, each chart is resized
// once per frame, outside the observer's callback (resizing in it would notify it again).
// add(box, plot) when a chart is built, remove(box) when it is destroyed, stop() on unmount.
export function sizedToBoxes(height) {
  const plots = new Map();  // box -> plot
  let frame = null;
  const observer = new ResizeObserver(() => {
    if (frame !== null) return;
    frame = requestAnimationFrame(() => {
      frame = null;
      for (const [box, plot] of plots) {
        const width = chartWidth(box);
        if (width !== plot.width) plot.setSize({ width, height });
      }
    });
  });
  return {
    add(box, plot) {
      plots.set(box, plot);
      observer.observe(box);
    },
    remove(box) {
      plots.delete(box);
      observer.unobserve(box);
    },
    stop() {
      cancelAnimationFrame(frame);
      observer.disconnect();
      plots.clear();
    },
  };
}
