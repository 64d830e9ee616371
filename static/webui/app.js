// Every page: relative times kept current, dialogs, confirmations, and the API helper.
import { relative } from "./format.js";

export function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]')?.content ?? "";
}

export class ApiError extends Error {}

// POST (or GET) JSON to the API with the session's CSRF token; the API's "detail" on failure.
export async function api(url, { method = "POST", body } = {}) {
  const options = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET") {
    options.headers["Content-Type"] = "application/json";
    options.headers["X-CSRFToken"] = csrfToken();
    options.body = JSON.stringify(body ?? {});
  }
  let response;
  try {
    response = await fetch(url, options);
  } catch {
    throw new ApiError("The server cannot be reached: check the connection and try again.");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = data.detail ?? Object.entries(data).map(([field, errors]) => `${field}: ${[].concat(errors).join(" ")}`).join("; ");
    throw new ApiError(detail || `The server answered ${response.status}.`);
  }
  return data;
}

// Replace each [data-live] section of this page with its fresh copy from the server.
export async function refreshSections(names = null) {
  const response = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
  if (!response.ok) return false;
  const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
  for (const section of fresh.querySelectorAll("[data-live]")) {
    const name = section.dataset.live;
    if (names && !names.includes(name)) continue;
    const current = document.querySelector(`[data-live="${name}"]`);
    if (current && !current.contains(document.activeElement)) current.replaceWith(document.importNode(section, true));
    else if (current) current.innerHTML = section.innerHTML;
  }
  refreshTimes();
  return true;
}

// A redraw soon, however many events ask for it: one at a time, and one more if an
// event came while the last one was loading (it may predate what the event announced).
export function refresher(after = () => {}, delay = 400) {
  let timer = null;
  let loading = false;
  let again = false;
  return function refreshSoon() {
    if (loading) { again = true; return; }
    if (timer) return;
    timer = setTimeout(async () => {
      timer = null;
      loading = true;
      try {
        await refreshSections();
        after();
      } catch {
        // A failed redraw leaves the page as it was; the next event tries again.
      } finally {
        loading = false;
        if (again) { again = false; refreshSoon(); }
      }
    }, delay);
  };
}

export function refreshTimes() {
  for (const time of document.querySelectorAll("time[data-relative]")) {
    const moment = new Date(time.getAttribute("datetime"));
    if (!Number.isNaN(moment.valueOf())) time.textContent = relative(moment);
  }
}

export function showError(message, where = document.querySelector("[data-page-error]")) {
  if (!where) return;
  where.textContent = message;
  where.hidden = !message;
}

// --- dialogs: modal, Escape and the close buttons close them, Tab stays inside ---------

const FOCUSABLE = 'a[href], button:not([disabled]), input:not([disabled]):not([type="hidden"]), select:not([disabled]), textarea:not([disabled]), [tabindex]:not([tabindex="-1"])';
const openers = new WeakMap();

export function openDialog(dialog, opener = document.activeElement) {
  openers.set(dialog, opener);
  dialog.showModal();
  const first = dialog.querySelector("[autofocus]") ?? dialog.querySelector("select, input:not([type=hidden]), textarea") ?? dialog.querySelector(FOCUSABLE);
  first?.focus();
}

document.addEventListener("click", (event) => {
  const close = event.target.closest("[data-close]");
  const dialog = close?.closest("dialog");
  if (dialog) { dialog.close(); return; }
  // A click on the backdrop lands on the dialog itself.
  if (event.target instanceof HTMLDialogElement && event.target.open) {
    const box = event.target.getBoundingClientRect();
    const inside = event.clientX >= box.left && event.clientX <= box.right && event.clientY >= box.top && event.clientY <= box.bottom;
    if (!inside) event.target.close();
  }
});

document.addEventListener("close", (event) => {
  if (!(event.target instanceof HTMLDialogElement)) return;
  const opener = openers.get(event.target);
  if (opener?.isConnected) opener.focus();
}, true);

document.addEventListener("keydown", (event) => {
  if (event.key !== "Tab") return;
  const dialog = document.querySelector("dialog[open]");
  if (!dialog) return;
  const items = [...dialog.querySelectorAll(FOCUSABLE)].filter((item) => item.offsetParent !== null);
  if (!items.length) return;
  const [first, last] = [items[0], items[items.length - 1]];
  if (event.shiftKey && (document.activeElement === first || !dialog.contains(document.activeElement))) {
    event.preventDefault();
    last.focus();
  } else if (!event.shiftKey && (document.activeElement === last || !dialog.contains(document.activeElement))) {
    event.preventDefault();
    first.focus();
  }
});

// A button with data-confirm asks first.
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-confirm]");
  if (button && !window.confirm(button.dataset.confirm)) event.preventDefault();
});

refreshTimes();
setInterval(refreshTimes, 30_000);
