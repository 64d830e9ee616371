"""The sweeps run in beat's own process now (webui.beat): the periodic tasks that sent them to
workers go."""
from django.db import migrations

SWEEP_TASKS = ("check jobs", "check protection")


def remove_sweep_tasks(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name__in=SWEEP_TASKS).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("webui", "0005_host_local_disk_ids"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(remove_sweep_tasks, migrations.RunPython.noop)]
