// The schedule form: presets fill the cron field; plain words and the next five runs follow
// what is typed; fields that only backups have hide for verify and gc schedules.
const form = document.querySelector(".schedule-form");
const cron = form.elements.cron;
const zone = form.elements.time_zone;
const kind = form.elements.kind;
const words = form.querySelector("[data-cron-words]");
const error = form.querySelector("[data-cron-error]");
const runs = form.querySelector("[data-next-runs]");

let timer = null;
let asked = 0;

async function preview() {
  const number = ++asked;
  const url = `${form.dataset.previewUrl}?${new URLSearchParams({ cron: cron.value, time_zone: zone.value })}`;
  let data;
  try {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    data = await response.json();
  } catch {
    return;
  }
  if (number !== asked) return;  // a newer keystroke's answer is on its way
  words.textContent = data.description ? data.description[0].toUpperCase() + data.description.slice(1) : "";
  error.textContent = data.error;
  error.hidden = !data.error;
  runs.replaceChildren(...data.next_runs.map((run) => {
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.dateTime = run.iso;
    time.textContent = run.text;
    item.append(time);
    return item;
  }));
  markPreset();
}

function previewSoon() {
  clearTimeout(timer);
  timer = setTimeout(preview, 250);
}

function markPreset() {
  for (const chip of form.querySelectorAll("[data-cron]")) chip.setAttribute("aria-pressed", String(chip.dataset.cron === cron.value.trim()));
}

function showKind() {
  const backup = kind.value === "backup";
  for (const part of form.querySelectorAll("[data-backup-only]")) part.hidden = !backup;
  for (const part of form.querySelectorAll("[data-sync-only]")) part.hidden = kind.value !== "sync";
  if (!backup) form.elements.disk.value = "";
}

form.addEventListener("click", (event) => {
  const chip = event.target.closest("[data-cron]");
  if (!chip) return;
  cron.value = chip.dataset.cron;
  cron.focus();
  preview();
});
cron.addEventListener("input", previewSoon);
zone.addEventListener("input", previewSoon);
kind.addEventListener("change", showKind);
showKind();
markPreset();
