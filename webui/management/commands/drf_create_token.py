"""drf_create_token USER: a new API token of USER, printed once (only its hash is stored)."""
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from knox.models import AuthToken

from webui.api.authentication import new_token


class Command(BaseCommand):
    help = ("Make an API token for a user and print it: it cannot be shown again, "
            "the database keeps only its hash.")

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("-r", "--reset", action="store_true",
                            help="revoke the user's other tokens first")

    def handle(self, *args, username: str, reset: bool, **options):
        users = get_user_model()._default_manager
        try:
            user = users.get_by_natural_key(username)
        except users.model.DoesNotExist:
            raise CommandError(f"Cannot create the Token: user {username} does not exist") from None
        if reset:
            AuthToken.objects.filter(user=user).delete()
        self.stdout.write(f"Generated token {new_token(user)} for user {username}")
