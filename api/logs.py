"""Log set-up of a server run: plain lines, or one JSON object per line (``FACE_LOG_FORMAT=json``), each with
the id of the request it belongs to (also returned in the ``X-Request-ID`` header)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from api.middleware import request_id_var

_PLAIN = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON object.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: str = "text") -> None:
    """Root handler for the service's own loggers (``api.*``, including the access line per request). Keeps
    a handler someone configured before (a test runner, an embedding app), and only adds the request id."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_PLAIN))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for handler in root.handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
