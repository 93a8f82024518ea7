"""Settings of the example project. The database comes from libpq's variables
(PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE), like psql's."""

import os

SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "mysite.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "pgstagechain.contrib.django",
    "ads",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PGDATABASE", "pgstagechain_example"),
        "USER": os.environ.get("PGUSER", ""),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", ""),
        "PORT": os.environ.get("PGPORT", ""),
        "OPTIONS": {"connect_timeout": 10},
    }
}

# pgstagechain: which pipelines exist, and how their workers run.
PGSTAGECHAIN_PIPELINES = ["ads.pipeline:pipeline"]
PGSTAGECHAIN_WORKER = {"concurrency": 10, "shutdown_timeout": 30}

# Logging: the library's loggers ("pgstagechain.worker", "pgstagechain.listener", ...) have
# no handlers of their own and follow this configuration like any other.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "{asctime} {levelname} {name}: {message}", "style": "{"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"pgstagechain": {"level": "INFO"}},
}
