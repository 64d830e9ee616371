"""Take a joined host's access away: its Redis user and database role stop working at once."""
from django.core.management.base import BaseCommand, CommandError

from webui import services
from webui.models import Host


class Command(BaseCommand):
    help = "Revoke a joined host's access to Redis and the catalog; its queued jobs are cancelled."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, *args, name: str, **options):
        host = Host.objects.filter(name=name).first()
        if host is None:
            raise CommandError(f"no host named {name!r}")
        try:
            services.hosts.revoke(host)
        except services.Refused as refused:
            raise CommandError(str(refused)) from None
        self.stdout.write(f"host {name}: access revoked")
