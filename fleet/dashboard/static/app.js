// edgefleet's own script: charts from data attributes. No inline scripts (the CSP forbids them).
"use strict";

// <div class="chart" data-chart='{"title": "...", "x": [unix seconds...],
//      "series": [{"label": "p50 ms", "values": [...]}, ...]}'></div>
function edgefleetCharts(root) {
  const colors = ["#1565c0", "#c62828", "#2e7d32", "#b26a00", "#6a1b9a", "#00838f"];
  root.querySelectorAll("[data-chart]").forEach((el) => {
    if (el.dataset.drawn === "1" || typeof uPlot === "undefined") return;
    const spec = JSON.parse(el.dataset.chart);
    const data = [spec.x].concat(spec.series.map((s) => s.values));
    const opts = {
      title: spec.title || "",
      width: Math.max(el.clientWidth, 300),
      height: spec.height || 180,
      series: [{}].concat(spec.series.map((s, i) => ({
        label: s.label, stroke: colors[i % colors.length], width: 1.5, spanGaps: false,
        // a bucket between two empty ones has no line to draw: a dot keeps it visible
        points: { show: true, size: 4, fill: colors[i % colors.length] },
      }))),
      axes: [{}, { size: 60 }],
    };
    el.textContent = "";
    new uPlot(opts, data, el);
    el.dataset.drawn = "1";
  });
}

document.addEventListener("DOMContentLoaded", () => edgefleetCharts(document));
document.addEventListener("htmx:afterSettle", (e) => edgefleetCharts(e.target));
