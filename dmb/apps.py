"""Optional ``INSTALLED_APPS`` entry: registers dmb's system checks."""

from django.apps import AppConfig


class DmbConfig(AppConfig):
    name = "dmb"
    verbose_name = "dmb shared-memory channel layer"

    def ready(self):
        from . import checks  # noqa: F401  (registers the checks)
