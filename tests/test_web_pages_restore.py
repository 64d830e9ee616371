"""The guarded restore dialog: every disk of every host, the unsuitable ones disabled with
the reason, the target's partitions beside the image's, and the name to type."""
from __future__ import annotations

import html as htmllib
import re
from unittest import mock

from django.test import override_settings
from django.utils import timezone
from support.web import PLAIN_STATIC, BaseTestCase, GiB

from webui.celery import app as celery_app
from webui.models import Disk, Host, Job

MiB = 1024 ** 2


@override_settings(STORAGES=PLAIN_STATIC)
class RestoreDialogTests(BaseTestCase):
    def setUp(self):
        mock.patch.object(celery_app, "send_task").start()
        self.addCleanup(mock.patch.stopall)
        self.image = self.make_image(disk=self.d1, size=10 * GiB, partitions=[
            {"name": "sdb1", "start": MiB, "size": 512 * MiB, "type": "ef", "fstype": "vfat",
             "label": None},
            {"name": "sdb2", "start": 513 * MiB, "size": 9 * GiB, "type": "83", "fstype": None,
             "label": None}])
        self.h2 = Host.objects.create(name="h2", last_seen=timezone.now())
        self.big = Disk.objects.create(host=self.h2, stable_id="wwn-0x50000000000000b1",
                                       model="Big Disk", serial="B1", size=40 * GiB,
                                       path="/dev/sda", partitions=[
                                           {"name": "sda1", "start": MiB, "size": 39 * GiB,
                                            "fstype": "xfs", "label": "media"}])
        self.small = Disk.objects.create(host=self.h2, stable_id="wwn-0x50000000000000c1",
                                         model="Small Disk", size=8 * GiB, path="/dev/sdb")
        self.mounted = Disk.objects.create(host=self.h2, stable_id="wwn-0x50000000000000d1",
                                           model="Mounted Disk", size=20 * GiB, path="/dev/sdc",
                                           mounted=True, mountpoints=["/srv/media"])
        self.gone = Disk.objects.create(host=self.h2, stable_id="wwn-0x50000000000000e1",
                                        model="Gone Disk", size=20 * GiB, present=False)
        self.read_only = Disk.objects.create(host=self.h2, stable_id="wwn-0x50000000000000f1",
                                             model="Write-protected", size=20 * GiB,
                                             path="/dev/sdd", read_only=True)

    def dialog(self, user=None) -> str:
        self.client.force_login(user or self.alice)
        response = self.client.get(f"/images/{self.image.pk}/restore/?fragment=1")
        self.assertEqual(response.status_code, 200)
        return response.content.decode()

    @staticmethod
    def options(html: str) -> dict[int, tuple[bool, bool, str]]:
        """disk id -> (disabled, selected, text) of each option of the target select."""
        found = {}
        for match in re.finditer(r'<option value="(\d+)"([^>]*)>(.*?)</option>', html, re.S):
            found[int(match.group(1))] = (" disabled" in match.group(2),
                                          " selected" in match.group(2),
                                          htmllib.unescape(match.group(3)))
        return found

    def test_it_lists_every_disk_of_every_host_with_the_reason_it_cannot_be_the_target(self):
        options = self.options(self.dialog())
        self.assertEqual(set(options), {self.d1.pk, self.d2.pk, self.big.pk, self.small.pk,
                                        self.mounted.pk, self.gone.pk, self.read_only.pk})
        self.assertEqual(options[self.small.pk][:2], (True, False))
        self.assertIn("too small: 8.0 GiB, the image is 10.0 GiB", options[self.small.pk][2])
        self.assertIn("mounted at /srv/media", options[self.mounted.pk][2])
        self.assertIn("gone: host h2 no longer reports it", options[self.gone.pk][2])
        self.assertIn("read-only", options[self.read_only.pk][2])
        for disk in (self.mounted, self.gone, self.read_only):
            self.assertTrue(options[disk.pk][0], disk.model)
        for disk in (self.d1, self.d2, self.big):
            self.assertFalse(options[disk.pk][0], disk.model)
        self.assertIn("h2 · Big Disk · /dev/sda · 40.0 GiB", options[self.big.pk][2])

    def test_the_image_own_disk_comes_first_and_is_chosen(self):
        html = self.dialog()
        options = self.options(html)
        self.assertEqual(next(iter(options)), self.d1.pk)
        self.assertEqual(options[self.d1.pk][:2], (False, True))
        self.assertIn("the image's own disk", options[self.d1.pk][2])
        self.assertIn(f"<code data-confirm-name>{self.d1.stable_id}</code>", html)
        self.assertRegex(html, r'<button type="submit" class="button danger" '
                               r'data-action="confirm-restore" disabled>')
        self.assertIn(f'data-api="/api/images/{self.image.pk}/restore/"', html)
        self.assertIn('<input id="restore-confirm" name="confirm"', html)

    def test_a_busy_disk_is_disabled_and_the_next_suitable_one_chosen(self):
        job = self.make_job(state=Job.State.RUNNING)  # a backup of d1
        options = self.options(self.dialog())
        self.assertTrue(options[self.d1.pk][0])
        self.assertIn(f"busy: backup job #{job.pk} is running", options[self.d1.pk][2])
        chosen = [disk for disk, (_, selected, _) in options.items() if selected]
        self.assertEqual(chosen, [self.d2.pk])

    def test_the_target_layout_is_shown_beside_the_image_layout(self):
        Disk.objects.filter(pk=self.d1.pk).update(partitions=[
            {"name": "sdb1", "start": MiB, "size": 10 * GiB - MiB, "fstype": "ntfs",
             "label": "Windows"}])
        html = self.dialog()
        target = re.search(r"<div data-target-layout>(.*?)</div>\s*</section>", html, re.S).group(1)
        image = re.search(r"<div data-image-layout>(.*?)</div>\s*</section>", html, re.S).group(1)
        for text in ("h1", "Disk One", "S1", "10.0 GiB", self.d1.stable_id, "/dev/sdb",
                     "<strong>ntfs</strong>", "Windows"):
            self.assertIn(text, target)
        self.assertIn("<strong>vfat</strong>", image)
        self.assertIn("EFI System", image)
        self.assertIn("Linux", image)
        # Each other suitable target's layout waits in a template, to show once chosen.
        big = re.search(rf'<template data-layout-for="{self.big.pk}">(.*?)</template>', html,
                        re.S).group(1)
        self.assertIn("<strong>xfs</strong>", big)
        self.assertIn("media", big)
        self.assertNotIn(f'data-layout-for="{self.small.pk}"', html)

    def test_without_a_suitable_disk_nothing_is_chosen_and_it_says_why(self):
        Disk.objects.filter(pk__in=[self.d1.pk, self.d2.pk, self.big.pk]).update(size=GiB)
        html = self.dialog()
        self.assertFalse(any(selected for _, selected, _ in self.options(html).values()))
        self.assertIn("No disk can take this image now", html)
        self.assertIn('name="confirm" autocomplete="off" autocapitalize="off" spellcheck="false" '
                      'disabled', html)

    def test_without_a_fragment_it_is_a_page_of_its_own(self):
        self.client.force_login(self.alice)
        html = self.client.get(f"/images/{self.image.pk}/restore/").content.decode()
        self.assertIn('<body data-page="restore"', html)
        self.assertIn("data-restore-form", html)

    def test_a_viewer_cannot_open_it(self):
        self.client.force_login(self.bob)
        response = self.client.get(f"/images/{self.image.pk}/restore/?fragment=1")
        self.assertEqual(response.status_code, 403)
        self.assertNotIn("confirm-restore", response.content.decode())

    def test_the_disk_page_has_the_dialog_and_a_restore_button_per_image(self):
        self.client.force_login(self.alice)
        html = self.client.get(f"/disks/{self.d1.pk}/").content.decode()
        self.assertIn('<dialog id="restore-dialog"', html)
        self.assertIn(f'data-action="restore" data-url="/images/{self.image.pk}/restore/"', html)
