// The guarded restore: the target's layout beside the image's, and a button that stays
// disabled until the target's id is typed exactly. Restoring one partition, only the disks
// at least as large as the chosen partition can be chosen.
import { api } from "./app.js";

export function setUpRestoreForm(form) {
  const select = form.querySelector("[data-target-select]");
  const input = form.querySelector('input[name="confirm"]');
  const button = form.querySelector('[data-action="confirm-restore"]');
  const name = form.querySelector("[data-confirm-name]");
  const layout = form.querySelector("[data-target-layout]");
  const error = form.querySelector("[data-dialog-error]");
  const partition = form.querySelector("[data-partition-select]");
  const label = button.textContent;
  const chosen = () => select.selectedOptions[0];
  const expected = () => (chosen() && !chosen().disabled ? chosen().dataset.confirm ?? "" : "");

  function check() {
    button.disabled = !expected() || input.value !== expected();
  }

  function targetChanged() {
    const template = form.querySelector(`template[data-layout-for="${select.value}"]`);
    layout?.replaceChildren(template ? template.content.cloneNode(true) : "");
    name.textContent = expected();
    input.value = "";
    input.disabled = !expected();
    error.hidden = true;
    check();
  }

  function fitTargets() {
    const needed = Number(partition.selectedOptions[0]?.dataset.size ?? Infinity);
    for (const option of select.options) {
      option.disabled = !option.value || "blocked" in option.dataset || Number(option.dataset.size) < needed;
    }
    if (!chosen() || chosen().disabled) {
      const first = [...select.options].find((option) => !option.disabled);
      select.value = first ? first.value : "";
    }
    targetChanged();
  }

  select.addEventListener("change", targetChanged);
  partition?.addEventListener("change", fitTargets);
  input.addEventListener("input", check);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    check();
    if (button.disabled) return;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    button.textContent = "Starting the restore…";
    try {
      const body = { target_disk: Number(select.value), confirm: input.value };
      if (partition) body.partition = Number(partition.value);
      const { job } = await api(form.dataset.api, { body });
      location.assign(`/jobs/${job}/`);
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
      button.textContent = label;
      button.removeAttribute("aria-busy");
      check();
    }
  });
  if (partition) fitTargets();
  check();
}
