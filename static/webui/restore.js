// The guarded restore: the target's layout beside the image's, and a button that stays
// disabled until the target's id is typed exactly.
import { api } from "./app.js";

export function setUpRestoreForm(form) {
  const select = form.querySelector("[data-target-select]");
  const input = form.querySelector('input[name="confirm"]');
  const button = form.querySelector('[data-action="confirm-restore"]');
  const name = form.querySelector("[data-confirm-name]");
  const layout = form.querySelector("[data-target-layout]");
  const error = form.querySelector("[data-dialog-error]");
  const label = button.textContent;
  const expected = () => select.selectedOptions[0]?.dataset.confirm ?? "";

  function check() {
    button.disabled = !expected() || input.value !== expected();
  }

  select.addEventListener("change", () => {
    const template = form.querySelector(`template[data-layout-for="${select.value}"]`);
    layout.replaceChildren(template ? template.content.cloneNode(true) : "");
    name.textContent = expected();
    input.value = "";
    input.disabled = !expected();
    error.hidden = true;
    check();
  });
  input.addEventListener("input", check);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    check();
    if (button.disabled) return;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    button.textContent = "Starting the restore…";
    try {
      const { job } = await api(form.dataset.api, { body: { target_disk: Number(select.value), confirm: input.value } });
      location.assign(`/jobs/${job}/`);
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
      button.textContent = label;
      button.removeAttribute("aria-busy");
      check();
    }
  });
  check();
}
