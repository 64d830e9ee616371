"""Run this host's disk inventory and record it, as its worker does every minute."""
from django.core.management.base import BaseCommand, CommandError

from webui import services


class Command(BaseCommand):
    help = "Record this host's disks (the engine's inventory) and mark the host seen."

    def handle(self, *args, **options):
        try:
            host = services.report_local_inventory(worker="manage.py report_inventory")
        except services.Refused as exc:
            raise CommandError(exc.message) from None
        disks = host.disks.filter(present=True)
        for disk in disks:
            self.stdout.write(f"{disk.stable_id}\t{disk.path}\t{disk.size}")
        self.stdout.write(f"host {host.name}: {len(disks)} disk(s) present")
