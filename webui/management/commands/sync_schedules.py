"""Write every schedule into django-celery-beat's tables."""
from django.core.management.base import BaseCommand

from webui import services


class Command(BaseCommand):
    help = "Create or update the beat entry of every schedule (beat picks the changes up)."

    def handle(self, *args, **options):
        self.stdout.write(f"{services.sync_schedules()} schedule(s) synced")
