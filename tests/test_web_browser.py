"""The pages in a real browser (Debian's chromium, headless) on the live server, a real
worker for this host and real Redis, with loop-device disks.

Logging in, live backup progress, the image in the history, the guarded restore
onto another disk byte for byte, a failed job's error, a viewer without job
buttons, every main page at a phone's width, screenshots in light and dark
(into docs/screenshots/ with SCREENSHOTS=1, for the README), and a file of an image
downloaded through the file browser byte for byte.
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from django.utils import timezone
from playwright.sync_api import expect
from engine import MiB, sha256_of
from support.devices import loop_device, mounted
from support.disks import PartSpec
from test_boot import requires_qemu_and_payload

from bench import bootable

from webui import services
from webui.models import Image, ImageCopy, Job, Schedule

pytest_plugins = ["support.browser"]

# Long enough to read for several progress events (about 0.25 s apart), short enough
# for a quick test: random data, then a sparse tail the engine passes over.
SOURCE_SIZE = 640 * MiB
SOURCE_RANDOM = 512 * MiB
JOB_TIMEOUT_MS = 90_000
PHONE_WIDTH = 390
SUCCEEDED = re.compile(r"\bsucceeded\b", re.IGNORECASE)
FAILED = re.compile(r"\bfailed\b", re.IGNORECASE)
CANCELLED = re.compile(r"\bcancell?ed\b", re.IGNORECASE)

# Every value the progress bars of the page take, as [value, max], kept across DOM
# changes; a reload would lose the list (the test then finds none).
WATCH_PROGRESS = """() => {
    window.progressSeen = [];
    const record = () => {
        for (const bar of document.querySelectorAll('progress[data-job-progress]')) {
            const last = window.progressSeen[window.progressSeen.length - 1];
            if (!last || last[0] !== bar.value || last[1] !== bar.max)
                window.progressSeen.push([bar.value, bar.max]);
        }
    };
    new MutationObserver(record).observe(document, {subtree: true, childList: true,
        attributes: true, attributeFilter: ['value', 'max']});
    window.setInterval(record, 25);
}"""

# Elements wider than the viewport, to name the culprit when a page overflows.
OVERFLOWING = """(width) => [...document.querySelectorAll('body *')]
    .filter(element => element.getBoundingClientRect().right > width + 0.5)
    .slice(0, 5)
    .map(element => element.tagName.toLowerCase()
         + (element.id ? '#' + element.id : '')
         + (element.className && typeof element.className === 'string'
            ? '.' + element.className.trim().split(/\\s+/).join('.') : '')
         + ' right=' + Math.round(element.getBoundingClientRect().right))"""


# What of an image's row and its open actions menu lies outside the viewport or is clipped
# by its card's scrolling table.
CUT_OFF = """(row) => {
    const wrap = document.querySelector(row).closest('.table-wrap');
    const limit = Math.min(window.innerWidth, wrap.getBoundingClientRect().right);
    return [...document.querySelectorAll(`${row} td, ${row} [data-action], ${row} a`)]
        .filter(element => element.getClientRects().length)
        .filter(element => element.getBoundingClientRect().right > limit + 0.5
                || element.getBoundingClientRect().left < -0.5)
        .map(element => (element.dataset.action || element.tagName.toLowerCase())
             + ' right=' + Math.round(element.getBoundingClientRect().right)
             + ' limit=' + Math.round(limit));
}"""


def image_row(page, image):
    """The image's row of the disk page, its actions menu opened."""
    row = page.locator(f'tr[data-image-id="{image.pk}"]')
    row.locator("[data-image-actions] summary").click()
    return row


def backed_up(lab, device: str):
    """The used-mode image a backup of `device` by this host's worker (started here) made."""
    lab.start_worker()
    disk = lab.disk(device)
    backup = lab.finished(lab.in_own_thread(services.start_backup, disk, mode="used",
                                            datastore=lab.datastore).pk)
    assert backup.state == Job.State.SUCCEEDED, backup.error
    return Image.objects.get(disk=disk)


def job_actions(visit) -> list[str]:
    """The data-action of every element on the page, shown or not."""
    return visit.page.eval_on_selector_all(
        "[data-action]", "elements => elements.map(element => element.dataset.action)")


def posting_forms(visit) -> list[str]:
    """Where each form of the page that posts sends it, but the logout form."""
    actions = visit.page.eval_on_selector_all(
        "form", "forms => forms.filter(form => form.method === 'post').map(form => form.action)")
    return [action for action in actions if not action.endswith("/accounts/logout/")]


def test_a_visit_without_login_lands_on_the_login_page_and_logging_in_returns_there(visitor):
    anonymous = visitor(None)
    page = anonymous.page
    for path in ("/", "/disks/1/", "/datastores/"):
        anonymous.open(path)
        assert page.url.split("?")[0].endswith("/accounts/login/"), (path, page.url)
        assert f"next={path}" in page.url.replace("%2F", "/"), page.url
        assert anonymous.body_page() == "login"

    anonymous.submit_login("alice", password="not-her-password")
    assert anonymous.body_page() == "login", page.url
    anonymous.submit_login("alice")
    assert page.url.endswith("/datastores/") and anonymous.body_page() == "datastores", page.url
    assert anonymous.script_errors == []


def test_a_backup_shows_live_progress_then_restores_through_the_guarded_dialog(lab, alice_page):
    source = lab.loop_disk("system.img", SOURCE_SIZE, SOURCE_RANDOM)
    target = lab.loop_disk("spare.img", SOURCE_SIZE)
    small = lab.loop_disk("small.img", 16 * MiB)
    with open(target, "r+b") as spare:  # marks where a restore that skipped a part would show
        spare.write(b"\xee" * MiB)
        spare.seek(SOURCE_SIZE - MiB)
        spare.write(b"\xee" * MiB)
    lab.start_worker()
    source_disk, target_disk, small_disk = lab.disk(source), lab.disk(target), lab.disk(small)
    page = alice_page.page

    alice_page.open(f"/disks/{source_disk.pk}/")
    assert alice_page.body_page() == "disk"
    expect(page.locator("tr[data-image-id]")).to_have_count(0)
    page.evaluate(WATCH_PROGRESS)
    navigations = []
    page.on("framenavigated", lambda frame: frame == page.main_frame and navigations.append(frame.url))
    page.locator('[data-action="backup"]').first.click()
    expect(page.locator("[data-job-state]")).to_have_text(SUCCEEDED, timeout=JOB_TIMEOUT_MS)

    seen = page.evaluate("window.progressSeen")
    assert seen is not None and navigations == [], ("the page was reloaded", navigations)
    values = [value for value, _ in seen]
    assert len(set(values)) >= 3, seen
    assert values == sorted(values), seen
    assert {total for value, total in seen if value} == {SOURCE_SIZE}, seen
    print(f"the progress bar took {len(set(values))} values without a reload")
    backup = Job.objects.get(kind="backup", disk=source_disk)
    assert backup.state == Job.State.SUCCEEDED, backup.error
    image = Image.objects.get(disk=source_disk)
    expect(page.locator(f'tr[data-image-id="{image.pk}"]')).to_be_visible()
    assert navigations == []

    image_row(page, image).locator('[data-action="restore"]').click()
    dialog = page.locator("dialog#restore-dialog")
    expect(dialog).to_be_visible()
    choice = dialog.locator('select[name="target_disk"]')
    expect(choice).to_have_value(str(source_disk.pk))  # the original disk, preselected
    too_small = choice.locator(f'option[value="{small_disk.pk}"]')
    expect(too_small).to_be_disabled()
    expect(too_small).to_contain_text("small")
    choice.select_option(str(target_disk.pk))
    expect(dialog.locator("[data-confirm-name]")).to_have_text(target_disk.stable_id)
    expect(dialog.locator("[data-target-layout]")).to_be_visible()
    expect(dialog.locator("[data-image-layout]")).to_be_visible()
    confirm = dialog.locator('button[data-action="confirm-restore"]')
    typed = dialog.locator('input[name="confirm"]')
    expect(confirm).to_be_disabled()
    for wrong in (source_disk.stable_id, target_disk.stable_id[:-1], target_disk.stable_id + "x"):
        typed.fill(wrong)
        expect(confirm).to_be_disabled()
    typed.fill(target_disk.stable_id)
    expect(confirm).to_be_enabled()
    with page.expect_navigation(url=re.compile(r"/jobs/\d+/$")):
        confirm.click()

    assert alice_page.body_page() == "job"
    restore = Job.objects.get(pk=int(page.url.rstrip("/").rsplit("/", 1)[1]))
    assert (restore.kind, restore.image_id, restore.target_disk_id) == \
        ("restore", image.pk, target_disk.pk)
    expect(page.locator("[data-job-state]")).to_have_text(SUCCEEDED, timeout=JOB_TIMEOUT_MS)
    restore.refresh_from_db()
    assert restore.state == Job.State.SUCCEEDED, restore.error
    assert sha256_of(target, SOURCE_SIZE) == sha256_of(source, SOURCE_SIZE)
    assert alice_page.script_errors == []


def test_a_failed_job_shows_its_error(lab, alice_page):
    vanishing = lab.disk_file("old-vm.img", 8 * MiB, 8 * MiB)
    lab.start_worker()
    disk = lab.disk(vanishing)
    vanishing.unlink()  # after the inventory: the backup finds nothing to read
    page = alice_page.page

    alice_page.open(f"/disks/{disk.pk}/")
    page.locator('[data-action="backup"]').first.click()
    expect(page.locator("[data-job-state]")).to_have_text(FAILED, timeout=JOB_TIMEOUT_MS)
    job = Job.objects.get(kind="backup", disk=disk)
    assert job.state == Job.State.FAILED and str(vanishing) in job.error, job.error
    expect(page.locator("[data-job-error]")).to_contain_text(job.error)

    alice_page.open(f"/jobs/{job.pk}/")
    expect(page.locator("[data-job-state]")).to_have_text(FAILED)
    expect(page.locator("[data-job-error]")).to_contain_text(job.error)
    alice_page.open("/")
    expect(page.locator(f'[data-disk-id="{disk.pk}"]')).to_have_attribute("data-protection", "failed")
    assert alice_page.script_errors == []


def test_a_viewer_sees_no_job_buttons(lab, alice_page, bob_page):
    small = lab.loop_disk("small.img", 16 * MiB, 16 * MiB)
    endless = lab.loop_disk("endless.img", 64 * 1024 * MiB)  # sparse: long to read, no room taken
    lab.start_worker()
    small_disk, endless_disk = lab.disk(small), lab.disk(endless)
    finished = lab.finished(lab.in_own_thread(services.start_backup, small_disk, mode="raw",
                                              datastore=lab.datastore).pk)
    assert finished.state == Job.State.SUCCEEDED, finished.error
    running = lab.in_own_thread(services.start_backup, endless_disk, mode="raw",
                                datastore=lab.datastore)
    lab.wait_for(lambda: Job.objects.get(pk=running.pk).state == Job.State.RUNNING,
                 "the long backup running")

    alice, bob = alice_page, bob_page
    pages = ["/", f"/disks/{small_disk.pk}/", f"/disks/{endless_disk.pk}/",
             f"/jobs/{finished.pk}/", f"/jobs/{running.pk}/", "/schedules/", "/datastores/",
             "/hosts/"]
    staff_actions, staff_forms = {}, {}
    for path in pages:
        alice.open(path)
        bob.open(path)
        staff_actions[path], staff_forms[path] = set(job_actions(alice)), posting_forms(alice)
        assert (job_actions(bob), posting_forms(bob)) == ([], []), path
    # The same pages give staff the buttons: the check above looks where they are.
    assert {"restore", "verify", "export", "delete", "backup"} <= staff_actions[pages[1]]
    assert "cancel" in staff_actions[f"/jobs/{running.pk}/"]
    assert {"gc", "verify-datastore", "add-remote"} <= staff_actions["/datastores/"]
    assert len(staff_forms["/datastores/"]) == 3

    alice.open(f"/jobs/{running.pk}/")
    alice.page.on("dialog", lambda dialog: dialog.accept())
    alice.page.click('button[data-action="cancel"]')
    expect(alice.page.locator("[data-job-state]")).to_have_text(CANCELLED, timeout=JOB_TIMEOUT_MS)
    assert Job.objects.get(pk=running.pk).state == Job.State.CANCELLED
    assert alice.script_errors == [] and bob.script_errors == []


def test_every_main_page_fits_a_phone_and_is_captured_in_light_and_dark(lab, visitor, screenshots):
    system = lab.loop_disk("system.img", 96 * MiB, partitions=(
        PartSpec(64 * MiB, "ext4"), PartSpec(16 * MiB, "swap"), PartSpec(8 * MiB, "fat16")))
    photos = lab.loop_disk("photos.img", 128 * MiB, label="gpt",
                           partitions=(PartSpec(120 * MiB, "ext4"),))
    archive = lab.loop_disk("archive.img", 256 * 1024 * MiB)  # sparse: runs while the pages are seen
    lab.start_worker()
    system_disk, photos_disk, archive_disk = lab.disk(system), lab.disk(photos), lab.disk(archive)
    schedule = Schedule.objects.create(disk=system_disk, datastore=lab.datastore, cron="0 3 * * *")
    services.sync_schedule(schedule)
    for disk in (system_disk, system_disk, photos_disk):
        job = lab.finished(lab.in_own_thread(services.start_backup, disk, mode="raw",
                                             datastore=lab.datastore).pk)
        assert job.state == Job.State.SUCCEEDED, job.error
    # An off-site copy of the newest image, as a sync job that ended well leaves it.
    offsite = services.add_remote("rclone::sftp,host=nas.lan,user=backup,pass=hunter2:/copies",
                                  label="b2-bucket", bwlimit="8M")
    synced = timezone.now() - dt.timedelta(hours=6)
    Job.objects.create(kind="sync", state=Job.State.SUCCEEDED, host=system_disk.host,
                       datastore=lab.datastore, destination=offsite, started=synced,
                       finished=synced + dt.timedelta(minutes=3))
    ImageCopy.objects.create(image=Image.objects.filter(disk=system_disk).first(),
                             datastore=offsite, synced_at=synced)
    running = lab.in_own_thread(services.start_backup, archive_disk, mode="raw",
                                datastore=lab.datastore)
    image = Image.objects.filter(disk=system_disk).first()
    pages = {"dashboard": "/", "disk": f"/disks/{system_disk.pk}/", "job": f"/jobs/{running.pk}/",
             "schedules": "/schedules/", "schedule-form": f"/schedules/new/?disk={system_disk.pk}",
             "datastores": "/datastores/", "hosts": "/hosts/"}
    captured = {"dashboard", "disk", "job", "schedules", "datastores", "hosts"}

    def open_restore_dialog(visit):
        visit.open(pages["disk"])
        row = image_row(visit.page, image)
        cut_off = visit.page.evaluate(CUT_OFF, f'tr[data-image-id="{image.pk}"]')
        assert cut_off == [], cut_off  # every action of the image on screen, none clipped
        row.locator('[data-action="restore"]').click()
        dialog = visit.page.locator("dialog#restore-dialog")
        expect(dialog).to_be_visible()
        # Another disk than the image's own: what will be overwritten differs from the image.
        dialog.locator('select[name="target_disk"]').select_option(str(photos_disk.pk))
        expect(dialog.locator("[data-confirm-name]")).to_have_text(photos_disk.stable_id)

    backgrounds = {}
    for scheme in ("light", "dark"):
        desktop = visitor("alice", color_scheme=scheme)
        for name, path in pages.items():
            desktop.open(path)
            assert desktop.body_page() == name, path
            if name == "job":  # a few live updates, for the rate, ETA and throughput chart
                expect(desktop.page.locator("[data-job-rate]")).to_contain_text("/s")
                desktop.page.wait_for_timeout(2000)
            if name in captured:
                screenshots(desktop, name, scheme)
            assert "hunter2" not in desktop.page.content(), path
        backgrounds[scheme] = desktop.page.evaluate(
            "getComputedStyle(document.body).backgroundColor")
        open_restore_dialog(desktop)
        screenshots(desktop, "restore-dialog", scheme, full_page=False)
        assert desktop.script_errors == []
    assert backgrounds["light"] != backgrounds["dark"], backgrounds

    phone = visitor("alice", width=PHONE_WIDTH)
    too_wide = {}

    def check_width(name):
        width = phone.page.evaluate("document.documentElement.scrollWidth")
        if width > PHONE_WIDTH:
            too_wide[name] = (width, phone.page.evaluate(OVERFLOWING, PHONE_WIDTH))

    for name, path in {**pages, "finished job": f"/jobs/{job.pk}/"}.items():
        phone.open(path)
        check_width(name)
    open_restore_dialog(phone)
    check_width("restore-dialog")
    phone.page.context.clear_cookies()
    phone.open("/accounts/login/")
    check_width("login")
    assert Job.objects.get(pk=running.pk).state == Job.State.RUNNING  # live all along
    lab.in_own_thread(services.cancel_job, running)
    assert lab.finished(running.pk).state == Job.State.CANCELLED
    assert too_wide == {}, too_wide
    assert phone.script_errors == []


def test_a_file_of_an_image_downloads_through_the_browser_byte_for_byte(lab, alice_page, tmp_path):
    device = lab.loop_disk("files.img", 40 * MiB, partitions=(PartSpec(24 * MiB, "ext4"),))
    known = bytes(range(256)) * (8 * 1024) + b"the end"
    with loop_device(device, MiB, 24 * MiB) as part, mounted(part, tmp_path / "mnt") as root:
        (root / "keep").mkdir()
        (root / "keep" / "photo.raw").write_bytes(known)
    image = backed_up(lab, device)
    page = alice_page.page

    alice_page.open(f"/disks/{image.disk_id}/")
    image_row(page, image).get_by_role("link", name="Browse files").click()
    assert alice_page.body_page() == "files"
    page.get_by_role("link", name="Partition 1", exact=True).click()
    page.get_by_role("link", name="keep/", exact=True).click()
    row = page.locator("tr", has_text="photo.raw")
    expect(row).to_contain_text("2.0 MiB")
    with page.expect_download() as waiting:
        row.get_by_role("link", name="Download", exact=True).click()
    download = waiting.value
    assert download.suggested_filename == "photo.raw"
    assert Path(download.path()).read_bytes() == known
    assert alice_page.script_errors == []


def test_a_boot_test_from_the_disk_page_shows_its_verdict_and_the_machine_s_screen(
        lab, alice_page):
    requires_qemu_and_payload()
    vm = lab.loop_disk("vm.img", 48 * MiB, partitions=(PartSpec(40 * MiB, "ext4"),))
    bootable.make_bios_bootable(Path(vm), 1)
    image = backed_up(lab, vm)
    page = alice_page.page
    alice_page.open(f"/disks/{image.disk_id}/")
    image_row(page, image).locator('[data-action="boot-test"]').click()
    job = lab.wait_for(lambda: Job.objects.filter(kind="boot", image=image).first(),
                       "the boot test's job")
    panel = page.locator(f'[data-job-panel][data-job-id="{job.pk}"]')
    expect(panel.locator("[data-job-state]")).to_have_text(SUCCEEDED, timeout=JOB_TIMEOUT_MS)
    job.refresh_from_db()
    assert job.result["verdict"] == "booted", job.error
    cell = page.locator(f'tr[data-image-id="{image.pk}"] td.boot-test')
    expect(cell.locator(".tag")).to_have_text("booted")
    thumbnail = cell.locator("img")
    expect(thumbnail).to_be_visible()
    assert thumbnail.evaluate("image => image.complete && image.naturalWidth") == 720
    alice_page.open(f"/jobs/{job.pk}/")
    screen = page.locator("[data-job-screen]")
    expect(screen).to_be_visible()
    assert screen.evaluate("image => image.complete && image.naturalWidth") == 720
    expect(page.locator("pre.console")).to_contain_text(bootable.LOGIN_PROMPT)
    assert alice_page.script_errors == []
