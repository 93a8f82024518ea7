"""pgstagechain as a Django app: settings, ``manage.py`` commands, install on ``migrate``.

Add ``"pgstagechain.contrib.django"`` to ``INSTALLED_APPS`` and name your pipelines::

    PGSTAGECHAIN_PIPELINES = ["ads.pipeline:pipeline"]

Then ``manage.py migrate`` installs the pgstagechain schema and the pipelines' triggers
(after your own tables exist), and ``manage.py pgstagechain_worker`` runs the workers.
The connection is the Django database ``PGSTAGECHAIN_DATABASE`` (default ``"default"``).
"""

from __future__ import annotations

from .conf import conninfo as conninfo
from .conf import pipelines as pipelines
from .conf import worker_options as worker_options
from .runner import close_orm_connections as close_orm_connections
from .runner import run_until_idle as run_until_idle

__all__ = ["close_orm_connections", "conninfo", "pipelines", "run_until_idle", "worker_options"]
