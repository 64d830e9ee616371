"""The dashboard: Django project and app in one package (see the folder layout in README)."""
from .celery import app as celery_app

__all__ = ["celery_app"]
