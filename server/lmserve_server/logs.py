"""The daemon's log output on stderr (journald under systemd): ``text`` or ``json``.

``json`` writes one object per line with ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``message``, any ``extra=`` fields of the call (``batch_size``, ``compute_ms``,
``request_id``, ...) and ``exception`` when there is a traceback. Library output
(transformers, Python warnings) is routed through the same handler so every line has the
chosen format.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = ("lmserve", "lmserve_server")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Sends every log record to stderr at ``level`` and above, in format ``fmt``."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    # ``debug`` is for lmserve's own loggers; libraries (grpc logs a line per call, asyncio)
    # stay at info.
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=max(numeric, logging.INFO), handlers=[handler], force=True)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    logging.captureWarnings(True)


def quiet_transformers() -> None:
    """Library chatter (weight-loading progress bars, generation hints) is not for operators;
    what is left goes through our handler rather than the library's own. Called once the
    serve path imports transformers: ``configure_logging`` itself needs no torch."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
