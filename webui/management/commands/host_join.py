"""A one-line join command for another host, as the Hosts page gives it."""
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from webui import services


class Command(BaseCommand):
    help = ("Print a join command for another host: run as root there, it installs the host's "
            "worker and starts it. It works once, within 24 hours.")

    def add_arguments(self, parser):
        parser.add_argument("name", help="the new host's name (letters, digits and ._-)")
        parser.add_argument("--url", help="this dashboard as the new host reaches it "
                                          "(default: http://HOST_NAME:PORT)")

    def handle(self, *args, name: str, url: str | None, **options):
        server = (url or f"http://{settings.HOST_NAME}:{settings.PORT}").rstrip("/")
        try:
            invitation = services.hosts.invite(name)
        except services.Refused as refused:
            raise CommandError(str(refused)) from None
        self.stdout.write(f"Run this as root on {name} before {invitation.expires:%Y-%m-%d %H:%M %Z}"
                          f" (it works once; the datastore must be mounted there at "
                          f"{invitation.datastore}):\n\n    {invitation.command(server)}\n")
