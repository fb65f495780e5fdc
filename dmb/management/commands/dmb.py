"""``manage.py dmb inspect``: ``python -m dmb.inspect`` for this project.

It takes the same arguments.  With no target (``--prefix``, ``--name``) it
looks at the segment of this project's ``CHANNEL_LAYERS`` (``--alias``
chooses among several dmb entries); ``--list`` lists every segment.  The
exit code is the tool's (docs/operations.md).
"""

import argparse
import logging
import sys

from django.conf import settings
from django.core.management.base import BaseCommand

from dmb import inspect as dmb_inspect

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Look into this project's dmb segment: `manage.py dmb inspect "
        "[--json | --watch | --peek CHANNEL | ...]`; `manage.py dmb inspect "
        "--help` lists every option."
    )
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["inspect"], help="what to do")
        parser.add_argument(
            "arguments",
            nargs=argparse.REMAINDER,
            help="options of python -m dmb.inspect",
        )

    def handle(self, *args, action, arguments, **options):
        code = dmb_inspect.main(
            arguments,
            channel_layers=getattr(settings, "CHANNEL_LAYERS", None) or {},
            prog="manage.py dmb inspect",
            stdout=_Stream(self.stdout),
            stderr=_Stream(self.stderr),
        )
        if code:
            sys.exit(code)


class _Stream:
    """Django's output wrapper, writing text as given (no added newline)."""

    def __init__(self, wrapper):
        self._wrapper = wrapper

    def write(self, text):
        self._wrapper.write(text, ending="")

    def flush(self):
        self._wrapper.flush()

    def isatty(self):
        return self._wrapper.isatty()
