"""A minimal site whose test run uses ChannelsLiveServerTestCase on dmb.

tests/test_liveserver.py runs ``python -m django test liveproject`` here.
LIVEPROJECT_DB_DIR names a folder for the SQLite files (the live server
runs in another process, so the test database cannot be in memory), and
LIVEPROJECT_BACKEND may name another layer, to show what fails without a
layer that crosses processes.
"""

import os

SECRET_KEY = "liveproject-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
INSTALLED_APPS = ["django.contrib.staticfiles", "channels", "dmb", "liveproject"]
ROOT_URLCONF = "liveproject.urls"
STATIC_URL = "/static/"
ASGI_APPLICATION = "liveproject.asgi.application"
USE_TZ = True

_db_dir = os.environ.get("LIVEPROJECT_DB_DIR", ".")
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_db_dir, "live.sqlite3"),
        "TEST": {"NAME": os.path.join(_db_dir, "test-live.sqlite3")},
    }
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": os.environ.get(
            "LIVEPROJECT_BACKEND", "dmb.SharedMemoryChannelLayer"
        ),
        "CONFIG": {"prefix": "liveproject"},
        "TEST_CONFIG": {"prefix": "liveproject-test", "size": 4 * 1024 * 1024},
    }
}
if "dmb" not in CHANNEL_LAYERS["default"]["BACKEND"]:
    CHANNEL_LAYERS["default"].pop("CONFIG")
    CHANNEL_LAYERS["default"].pop("TEST_CONFIG")

TEST_RUNNER = "dmb.testing.DiscoverRunner"
