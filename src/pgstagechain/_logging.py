"""Log records as one JSON object a line, for log shippers (``--log-format json``)."""

from __future__ import annotations

import datetime as dt
import json
import logging

#: Fields a run's logger adds to every record (see ``StageContext.log``).
RUN_FIELDS = ("pipeline", "stage", "key", "attempt", "run_id")


class JsonFormatter(logging.Formatter):
    """Time, level, logger, message, the run's fields when present, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in RUN_FIELDS:
            if field in record.__dict__:
                entry[field] = record.__dict__[field]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
