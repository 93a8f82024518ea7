"""A one-file Django project that includes the dashboard's URLconf, served under uvicorn:
``DJANGO_SETTINGS_MODULE=tests.apps.django_dashboard uvicorn tests.apps.django_dashboard:application``.

The database is ``PGSTAGECHAIN_DSN``, the write token ``PGSTAGECHAIN_DASHBOARD_TOKEN``; the
pipeline is the seed's (``tests.apps.cli_app``). Importing it configures Django: keep it
out of the test process.
"""

from __future__ import annotations

import os

from django.urls import include, path
from psycopg.conninfo import conninfo_to_dict

TOKEN = os.environ.get("PGSTAGECHAIN_DASHBOARD_TOKEN", "")
_params = conninfo_to_dict(os.environ.get("PGSTAGECHAIN_DSN", ""))

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = __name__
USE_TZ = True
INSTALLED_APPS = ["pgstagechain.contrib.django"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _params.get("dbname", ""),
        "USER": _params.get("user", ""),
        "HOST": _params.get("host", ""),
        "PORT": _params.get("port", ""),
    }
}
PGSTAGECHAIN_PIPELINES = ["tests.apps.cli_app:pipeline"]
PGSTAGECHAIN_DASHBOARD = {"writes": True, "token": TOKEN, "staff_only": False, "cache_seconds": 0}

urlpatterns = [path("ops/dashboard/", include("pgstagechain.contrib.django.dashboard"))]


def _application():  # type: ignore[no-untyped-def]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", __name__)
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


application = _application()
