// A job's page: live progress, its throughput over time (kept across reloads in this
// tab), read errors as they are found, "stalled since", Cancel; it reconnects by itself
// and reads the job afresh after a drop.
import { api, refreshSections, showError } from "./app.js";
import { drawLine } from "./chart.js";
import { clock, size } from "./format.js";
import { ACTIVE, showJob } from "./jobview.js";
import { LiveSocket, connectionBadge } from "./live.js";

const view = document.querySelector("[data-job-view]");
const id = Number(view.dataset.jobId);
const initial = JSON.parse(document.getElementById("job-data").textContent);
const store = `job-rate-${id}`;
const samples = JSON.parse(sessionStorage.getItem(store) ?? "[]");
const rateChart = document.querySelector('[data-chart="rate"]');
const stalled = document.querySelector("[data-job-stalled]");
const stalledSince = document.querySelector("[data-stalled-since]");
let lastDone = initial.progress?.done ?? 0;
let movedAt = initial.started ? new Date(initial.started) : new Date();
let lastBad = initial.progress?.bad_bytes ?? 0;
let state = initial.state;

function sample(progress) {
  if (!progress || progress.rate === undefined || progress.unit !== "bytes") return;
  const seconds = (progress.sent_at ?? Date.now() / 1000);
  const last = samples[samples.length - 1];
  if (last && seconds - last[0] < 0.2) return;
  samples.push([seconds, progress.rate]);
  if (samples.length > 900) samples.splice(0, samples.length - 900);
  sessionStorage.setItem(store, JSON.stringify(samples));
  drawRate();
  showPeak();
}

// Read errors found while it runs: a mark where the job was reading when the count grew.
function markBad(progress) {
  const strip = document.querySelector("[data-badmap] svg");
  if (!strip || !progress.total) return;
  const done = strip.querySelector("[data-badmap-done]");
  done?.setAttribute("width", String((1000 * progress.done) / progress.total));
  if ((progress.bad_bytes ?? 0) > lastBad) {
    const mark = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    mark.setAttribute("class", "bad");
    mark.setAttribute("x", String((1000 * progress.done) / progress.total));
    mark.setAttribute("width", "3");
    mark.setAttribute("y", "0");
    mark.setAttribute("height", "24");
    strip.append(mark);
    document.querySelector("[data-badmap-note]").textContent = `${size(progress.bad_bytes)} unreadable so far, stored as zeros.`;
  }
  lastBad = progress.bad_bytes ?? lastBad;
}

// The server flags a job stalled (in a whole-job message); progress that moves clears it.
function showStalled(message) {
  const progress = message.progress ?? {};
  const moved = progress.done !== undefined && progress.done !== lastDone;
  if (moved) {
    lastDone = progress.done;
    movedAt = new Date();
  }
  let flagged = !stalled.hidden;
  if ("stalled" in message) flagged = message.stalled;
  else if (moved) flagged = false;
  if (!ACTIVE.includes(message.state)) flagged = false;
  if (flagged && !stalledSince.getAttribute("datetime")) {
    stalledSince.setAttribute("datetime", movedAt.toISOString());
    stalledSince.textContent = clock(movedAt);
  }
  if (!flagged) stalledSince.setAttribute("datetime", "");
  stalled.hidden = !flagged;
}

function onJob(message) {
  if ((message.job ?? message.id) !== id) return;
  showJob(view, message);
  showStalled(message);
  if (message.progress && message.state === "running") sample(message.progress);
  if (message.progress) {
    markBad(message.progress);
  }
  const finished = message.state && !ACTIVE.includes(message.state);
  if (finished && ACTIVE.includes(state)) {
    socket?.stop();
    document.querySelector("[data-connection]").hidden = true;
    document.querySelector('[data-action="cancel"]')?.remove();
    refreshSections();  // the log, the details, the image's read-error map
  } else if ("kind" in message && message.state !== state) {
    refreshSections(["details", "log"]);  // started: when, on which worker
  }
  if (message.state) state = message.state;
}

// A boot test's screen, as the worker last saw it, while the job runs; the card is redrawn
// when the job ends, so the screen is looked up each time and its events caught on the way.
const SCREEN = "[data-job-screen]";
for (const [name, hidden] of [["error", true], ["load", false]]) {
  document.addEventListener(name, (event) => {
    if (event.target.matches?.(SCREEN)) event.target.hidden = hidden;
  }, true);
}
if (document.querySelector(SCREEN) && ACTIVE.includes(state)) {
  const following = setInterval(() => {
    const screen = document.querySelector(SCREEN);
    if (!ACTIVE.includes(state) || !screen) {
      clearInterval(following);
      return;
    }
    if (!document.hidden) screen.src = `/jobs/${id}/screen.png?at=${Date.now()}`;
  }, 2000);
}

// A finished job changes no more: nothing to listen to.
const socket = ACTIVE.includes(state) ? new LiveSocket(`/ws/jobs/${id}/`, {
  onMessage: onJob,
  onStatus: connectionBadge(document.querySelector("[data-connection]")),
  async onReconnect() {
    try {
      onJob(await api(`/api/jobs/${id}/`, { method: "GET" }));
    } catch {
      // The socket sends the job again anyway.
    }
  },
}) : null;
if (!socket) document.querySelector("[data-connection]").hidden = true;

document.querySelector('[data-action="cancel"]')?.addEventListener("click", async (event) => {
  const button = event.currentTarget;
  button.disabled = true;
  try {
    await api(button.dataset.url);
    button.textContent = "Cancel requested";
    showError("");
  } catch (failure) {
    button.disabled = false;
    showError(failure.message);
  }
});

// A boot test's page has a screen instead of the throughput chart.
function drawRate() {
  if (!rateChart) return;
  const enough = samples.length >= 2;
  rateChart.toggleAttribute("hidden", !enough);  // an SVG element has no .hidden
  document.querySelector("[data-rate-empty]").hidden = enough;
  drawLine(rateChart, samples, document.querySelector("[data-rate-axis]"));
}

function showPeak() {
  if (!rateChart) return;
  const peak = Math.max(0, ...samples.map(([, value]) => value));
  document.querySelector("[data-rate-peak]").textContent = peak ? `peak ${size(peak)}/s` : "";
}

drawRate();
showPeak();
