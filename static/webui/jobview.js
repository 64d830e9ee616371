// Puts a job's state and progress into the elements of a page that show it.
import { amount, duration, exactBytes, rate, size } from "./format.js";

export const ACTIVE = ["queued", "running"];
// What each phase is called, as the server's job kinds say (the page holds them).
const PHASES = JSON.parse(document.getElementById("phase-words")?.textContent ?? "{}");

// A message is a whole job (the snapshot, a state change) or {job, state, progress}.
export function jobId(message) {
  return message.job ?? message.id;
}

function field(root, name) {
  return root.querySelector(`[data-job-${name}]`) ?? root.querySelector(`[data-field="${name}"]`);
}

function put(element, text, title = null) {
  if (!element) return;
  element.textContent = text;
  if (title) element.title = title; else element.removeAttribute("title");
}

export function showJob(root, message) {
  const state = message.state;
  const progress = message.progress ?? {};
  const unit = progress.unit ?? root.dataset.unit ?? "bytes";
  const active = ACTIVE.includes(state);
  root.dataset.state = state;
  const stateBadge = field(root, "state");
  if (stateBadge && state) {
    stateBadge.textContent = state;
    stateBadge.className = stateBadge.className.replace(/\bstate-\S+/g, "").trim() + ` state-${state}`;
  }
  const bar = root.querySelector("progress");
  const { done = 0, total = 0 } = progress;
  if (bar && total > 0) {
    bar.max = total;
    bar.value = Math.min(done, total);
  } else if (bar && state === "queued") {
    bar.removeAttribute("value");
  }
  const note = field(root, "note");
  if (note && state !== "queued") note.hidden = true;
  if (state === "queued") put(field(root, "phase"), "waiting for a worker");
  else if (active) put(field(root, "phase"), PHASES[progress.phase] ?? progress.phase ?? "starting");
  else put(field(root, "phase"), "finished");
  const percent = total > 0 ? (100 * done) / total : null;
  const percentField = field(root, "percent");
  if (percentField) put(percentField, percent === null ? "—" : `${percent.toFixed(percentField.dataset.jobPercent !== undefined ? 1 : 0)} %`);
  if (total > 0) put(field(root, "done"), `${amount(done, unit)} of ${amount(total, unit)}`, unit === "bytes" ? `${exactBytes(done)} of ${exactBytes(total)}` : null);
  const rateField = field(root, "rate");
  if (rateField) put(rateField, active && progress.rate ? rate(progress.rate, unit) : (rateField.closest("dd") ? "—" : ""));
  const etaField = field(root, "eta");
  if (etaField) {
    const inDd = Boolean(etaField.closest("dd") || etaField.tagName === "DD");
    put(etaField, active && progress.eta ? (inDd ? duration(progress.eta) : `${duration(progress.eta)} left`) : (inDd ? "—" : ""));
  }
  if (progress.stored_bytes !== undefined) {
    put(field(root, "stored"), size(progress.stored_bytes), exactBytes(progress.stored_bytes));
    put(field(root, "new"), size(progress.new_bytes ?? 0), exactBytes(progress.new_bytes ?? 0));
  }
  const bad = field(root, "bad");
  if (bad && progress.bad_bytes !== undefined) {
    bad.innerHTML = "";
    if (progress.bad_bytes) {
      const span = document.createElement("span");
      span.className = "bad-text";
      span.textContent = size(progress.bad_bytes);
      span.title = exactBytes(progress.bad_bytes);
      bad.append(span);
    } else bad.textContent = "none";
  }
  // A whole job carries its error (a progress event does not).
  if ("error" in message) {
    const error = field(root, "error");
    if (error) {
      error.textContent = message.error ?? "";
      error.hidden = !message.error;
      error.classList.toggle("warning", state === "succeeded-with-warnings");
    }
  }
}
