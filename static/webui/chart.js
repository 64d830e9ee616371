// Charts: a read-out of the point under the pointer (or the arrow keys), and live lines.
import { clock, size } from "./format.js";

export function attachReadout(figure) {
  if ("attached" in figure.dataset) return;
  figure.dataset.attached = "";
  const svg = figure.querySelector("svg");
  const data = figure.querySelector('script[type="application/json"]');
  const output = figure.querySelector("[data-readout]");
  const cursor = figure.querySelector(".cursor");
  if (!svg || !data || !output) return;
  const points = JSON.parse(data.textContent);
  const names = [...figure.querySelectorAll(".key")].map((key) => key.textContent.toLowerCase());
  const width = svg.viewBox.baseVal.width;
  let index = points.length - 1;

  function show(i) {
    index = Math.max(0, Math.min(points.length - 1, i));
    const [x, when, ...values] = points[index];
    cursor.setAttribute("x1", x);
    cursor.setAttribute("x2", x);
    cursor.removeAttribute("hidden");
    output.textContent = `${clock(new Date(when))} · ` + values.map((value, n) => `${names[n] ?? ""} ${size(value)}`).join(" · ");
  }

  function hide() {
    cursor.setAttribute("hidden", "");
    output.textContent = "";
  }

  svg.addEventListener("pointermove", (event) => {
    const box = svg.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * width;
    let best = 0;
    for (let i = 1; i < points.length; i += 1) if (Math.abs(points[i][0] - x) < Math.abs(points[best][0] - x)) best = i;
    show(best);
  });
  svg.addEventListener("pointerleave", hide);
  figure.tabIndex = 0;
  figure.title = "Arrow keys: step through the backups";
  figure.addEventListener("focus", () => show(index));
  figure.addEventListener("blur", hide);
  figure.addEventListener("keydown", (event) => {
    const step = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity }[event.key];
    if (step === undefined) return;
    event.preventDefault();
    show(Number.isFinite(step) ? index + step : step < 0 ? 0 : points.length - 1);
  });
}

// Draws samples [[seconds, value], ...] as a line and an area in a 720 x 200 viewBox.
export function drawLine(svg, samples, axis) {
  const [area, line] = svg.querySelectorAll("path");
  if (samples.length < 2) {
    area.setAttribute("d", "");
    line.setAttribute("d", "");
    return;
  }
  const width = 720, height = 200, top = 18;
  const start = samples[0][0];
  const span = Math.max(samples[samples.length - 1][0] - start, 1);
  const peak = Math.max(...samples.map(([, value]) => value), 1);
  const x = (t) => ((t - start) / span) * width;
  const y = (v) => top + (height - top) * (1 - v / peak);
  const path = samples.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  line.setAttribute("d", path);
  area.setAttribute("d", `${path} L${width},${height} L0,${height} Z`);
  if (axis) {
    axis.innerHTML = "";
    const label = document.createElement("span");
    label.style.top = `${(top / height) * 100}%`;
    label.textContent = `${size(peak)}/s`;
    axis.append(label);
  }
}

export function attachReadouts() {
  for (const figure of document.querySelectorAll("figure.chart[data-chart]")) attachReadout(figure);
}

attachReadouts();
