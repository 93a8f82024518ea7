"""pgstagechain: multi-stage pipelines driven by PostgreSQL.

Declare stages over a table you already have; a trigger announces every row that
reaches a stage's done state, a :class:`Worker` claims the next stage atomically and
runs its handler, and a recovery scan re-drives whatever a lost notification or a
crashed worker left behind.
"""

from __future__ import annotations

from . import admin as admin
from ._by_hand import claim as claim
from ._by_hand import complete as complete
from ._by_hand import complete_sync as complete_sync
from ._by_hand import fail as fail
from ._connect import redact as redact
from ._context import Claim as Claim
from ._context import FailedMember as FailedMember
from ._context import StageContext as StageContext
from ._events import MalformedNotification as MalformedNotification
from ._gc import tune_gc as tune_gc
from ._install import migrate as migrate
from ._install import plan_migration as plan_migration
from ._install import uninstall as uninstall
from ._listener import Backoff as Backoff
from ._listener import Listener as Listener
from ._migration_plan import GraphPlan as GraphPlan
from ._pipeline import Pipeline as Pipeline
from ._pipeline import Statuses as Statuses
from ._recovery import RecoveryReport as RecoveryReport
from ._recovery import RecoveryScanner as RecoveryScanner
from ._retention import Retention as Retention
from ._runs import WorkerStats as WorkerStats
from ._stage import FanIn as FanIn
from ._stage import Retry as Retry
from ._stage import Stage as Stage
from ._stage import stage as stage
from ._worker import Worker as Worker
from .errors import ConfigurationError as ConfigurationError
from .errors import DatabaseAccessError as DatabaseAccessError
from .errors import ExistingRowsError as ExistingRowsError
from .errors import GraphChangeError as GraphChangeError
from .errors import LeaseLostError as LeaseLostError
from .errors import NotInstalledError as NotInstalledError
from .errors import PermanentError as PermanentError
from .errors import PgStageChainError as PgStageChainError
from .errors import SchemaMismatchError as SchemaMismatchError
from .errors import StageDeclarationError as StageDeclarationError
from .errors import StartupTimeoutError as StartupTimeoutError

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "Claim",
    "ConfigurationError",
    "DatabaseAccessError",
    "ExistingRowsError",
    "FailedMember",
    "FanIn",
    "GraphChangeError",
    "GraphPlan",
    "LeaseLostError",
    "Listener",
    "MalformedNotification",
    "NotInstalledError",
    "PermanentError",
    "PgStageChainError",
    "Pipeline",
    "RecoveryReport",
    "RecoveryScanner",
    "Retention",
    "Retry",
    "SchemaMismatchError",
    "Stage",
    "StageContext",
    "StageDeclarationError",
    "StartupTimeoutError",
    "Statuses",
    "Worker",
    "WorkerStats",
    "admin",
    "claim",
    "complete",
    "complete_sync",
    "fail",
    "migrate",
    "plan_migration",
    "redact",
    "stage",
    "tune_gc",
    "uninstall",
]
