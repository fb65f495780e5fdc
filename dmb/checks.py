"""Django system checks of every CHANNEL_LAYERS entry that uses dmb.

    dmb.E001  a CONFIG option is wrong (the message names it)
    dmb.E002  a TEST_CONFIG option is wrong, laid over CONFIG for test runs
    dmb.W001  a channels_redis option that means nothing on one host
              (hosts, symmetric_encryption_keys) is set and ignored
    dmb.W002  two aliases share one prefix, so they share one segment
"""

from django.conf import settings
from django.core import checks

from .errors import ConfigError
from .layer import BACKENDS, validate_config
from .testing import test_config



@checks.register("dmb")
def check_channel_layers(app_configs=None, **kwargs):
    messages = []
    prefixes = {}
    for alias, entry in getattr(settings, "CHANNEL_LAYERS", {}).items():
        if entry.get("BACKEND") not in BACKENDS:
            continue
        config = entry.get("CONFIG", {})
        try:
            options = validate_config(config)
        except ConfigError as exc:
            messages.append(
                checks.Error(str(exc), id="dmb.E001", obj=f"CHANNEL_LAYERS[{alias!r}]")
            )
            continue
        if "TEST_CONFIG" in entry:
            try:
                test_config(alias, entry)
            except ConfigError as exc:
                messages.append(
                    checks.Error(
                        str(exc), id="dmb.E002", obj=f"CHANNEL_LAYERS[{alias!r}]"
                    )
                )
        for key in options["ignored"]:
            messages.append(
                checks.Warning(
                    f"CONFIG {key!r} is ignored by dmb: all processes share one "
                    f"host's memory, so there is no server to reach or traffic "
                    f"to encrypt",
                    hint="Remove it, or keep it for the day you switch back to "
                    "channels_redis.",
                    id="dmb.W001",
                    obj=f"CHANNEL_LAYERS[{alias!r}]",
                )
            )
        other = prefixes.setdefault(options["prefix"], alias)
        if other != alias:
            messages.append(
                checks.Warning(
                    f"aliases {other!r} and {alias!r} use the same prefix "
                    f"{options['prefix']!r}, so they share one segment",
                    hint="Give each alias its own CONFIG 'prefix'.",
                    id="dmb.W002",
                    obj=f"CHANNEL_LAYERS[{alias!r}]",
                )
            )
    return messages
