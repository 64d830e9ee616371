"""Whether this machine's settings reach the catalog's database and Redis, one line each."""
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection

from webui import launcher


class Command(BaseCommand):
    help = "Check that the database and Redis of this machine's settings answer."

    def handle(self, *args, **options):
        database = settings.DATABASES["default"]
        where = (database["NAME"] if "sqlite" in database["ENGINE"] else
                 f"{database['NAME']} at {database.get('HOST') or 'localhost'}:"
                 f"{database.get('PORT') or 5432}")
        problems = []
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            self.stdout.write(f"database {where}: answers")
        except DatabaseError as error:
            problems.append(f"database {where}: {str(error).strip().splitlines()[0]}")
        problem = launcher.redis_problem(settings.REDIS_URL)
        if problem is None:
            self.stdout.write(f"redis {launcher.shown_url(settings.REDIS_URL)}: answers")
        else:
            problems.append(f"redis: {problem}")
        if problems:
            raise CommandError("; ".join(problems) + ". The machine serving the dashboard must "
                               "let this one in: PostgreSQL's listen_addresses and pg_hba.conf, "
                               "Redis listening on an address this machine reaches")
