"""Rebuild a datastore's image catalog from the datastore itself."""
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from webui import services


class Command(BaseCommand):
    help = "Rebuild the catalog of a datastore's images from its directory (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--store", default=None,
                            help="the datastore directory (default: IMAGING_DATASTORE)")

    def handle(self, *args, store=None, **options):
        store = store or str(settings.IMAGING_DATASTORE)
        try:
            change = services.rescan(store)
        except services.Refused as exc:
            raise CommandError(exc.message) from None
        for problem in change.unreadable:
            self.stderr.write(f"unreadable image left out: {problem}")
        self.stdout.write(f"{store}: {change.images} images, {change.added} added, "
                          f"{change.removed} removed")
