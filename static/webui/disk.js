// A disk's page: "Back up now" and "Verify" start jobs through the API and follow them
// live here; Restore opens the guarded dialog; Export and Delete open their forms.
import { api, openDialog, refreshSections, refresher, showError } from "./app.js";
import { attachReadouts } from "./chart.js";
import { ACTIVE, jobId, showJob } from "./jobview.js";
import { LiveSocket, connectionBadge } from "./live.js";
import { setUpRestoreForm } from "./restore.js";

let watching = null;
let connection = null;

const panel = () => document.querySelector("[data-job-panel]");
const badge = () => connectionBadge(document.querySelector("#latest-job [data-connection]"));

function followPanel() {
  attachReadouts();
  if (connection) badge()(connection);
  const shown = panel();
  if (shown && ACTIVE.includes(shown.dataset.state)) watch(Number(shown.dataset.jobId));
}

const refreshSoon = refresher(followPanel);

function watch(id) {
  if (watching?.id === id) return;
  watching?.socket.stop();
  const onJob = (message) => {
    if (jobId(message) !== id) return;
    const shown = panel();
    if (shown && Number(shown.dataset.jobId) === id) showJob(shown, message);
    if (message.state && !ACTIVE.includes(message.state)) {
      socket.stop();
      watching = null;
      connection = null;
      document.querySelector("#latest-job [data-connection]")?.setAttribute("hidden", "");
      refreshSoon();  // the final state, the new image's row, the disk's protection
    }
  };
  const socket = new LiveSocket(`/ws/jobs/${id}/`, {
    onMessage: onJob,
    onStatus(state) {
      connection = state;
      badge()(state);
    },
    async onReconnect() {
      try {
        onJob(await api(`/api/jobs/${id}/`, { method: "GET" }));
      } catch {
        // The socket's own snapshot follows anyway.
      }
    },
  });
  watching = { id, socket };
}

async function startJob(button) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    const { job } = await api(button.dataset.url);
    showError("");
    await refreshSections();
    followPanel();
    watch(job);
  } catch (failure) {
    showError(failure.message);
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

async function openRestore(button) {
  const dialog = document.getElementById("restore-dialog");
  const response = await fetch(`${button.dataset.url}?fragment=1`, { credentials: "same-origin" });
  if (!response.ok) {
    showError(response.status === 404 ? "That image is gone: reload the page." : `The restore dialog did not load (${response.status}).`);
    return;
  }
  dialog.innerHTML = await response.text();
  setUpRestoreForm(dialog.querySelector("[data-restore-form]"));
  openDialog(dialog, button);
}

// A VM disk format: its file extension, and no zstd options (a disabled field is not sent).
function showExportFormat(form) {
  const chosen = form.elements.format.selectedOptions[0];
  const extensions = [...form.elements.format.options].map((option) => option.dataset.extension);
  const name = form.elements.name.value;
  const known = extensions.find((extension) => name.endsWith(extension));
  if (known) form.elements.name.value = name.slice(0, -known.length) + chosen.dataset.extension;
  for (const part of form.querySelectorAll("[data-stream-only]")) {
    part.hidden = chosen.value !== "zstd";
    for (const field of part.querySelectorAll("input")) field.disabled = part.hidden;
  }
}

document.addEventListener("change", (event) => {
  if (event.target.matches("[data-export-format]")) showExportFormat(event.target.form);
});

function openForm(id, button, fill) {
  const dialog = document.getElementById(id);
  const form = dialog.querySelector("form");
  form.action = button.dataset.url;
  fill(form);
  openDialog(dialog, button);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-action]");
  if (!button || button.disabled) return;
  switch (button.dataset.action) {
    case "backup":
    case "verify":
    case "boot-test":
      startJob(button);
      break;
    case "restore":
    case "restore-partition":
      openRestore(button);
      break;
    case "export":
      openForm("export-dialog", button, (form) => {
        form.elements.name.value = button.dataset.name;
        form.elements.format.value = "zstd";
        showExportFormat(form);
      });
      break;
    case "delete":
      openForm("delete-dialog", button, (form) => { form.querySelector('[data-fill="taken"]').textContent = button.dataset.taken; });
      break;
    default:
  }
});

// The restore as a page of its own (/images/<id>/restore/).
const page = document.querySelector("[data-restore-page]");
if (page) {
  setUpRestoreForm(page.querySelector("[data-restore-form]"));
  page.addEventListener("click", (event) => {
    if (event.target.closest("[data-close]")) location.assign(page.dataset.back);
  });
}

followPanel();
