"""The dmb Celery example: background jobs with no broker and no server.

Importing the package loads the Celery app, so ``@shared_task`` tasks bind
to it in every process (Django's, Celery's worker and beat).
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
