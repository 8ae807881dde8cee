"""The daemon's log output on stderr (journald under systemd): ``text`` or ``json``.

``json`` writes one object per line with ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``message``, any ``extra=`` fields of the call (``batch_size``, ``compute_ms``,
``request_id``, ...) and ``exception`` when there is a traceback. Library output
(transformers, Python warnings) is routed through the same handler so every line has the
chosen format. What is written to file descriptor 2 behind logging's back (gRPC core's own
log lines, such as TLS handshake failures; C libraries; a crash's traceback) is caught by
``StderrToJson`` in JSON mode and written as JSON objects too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, TextIO

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


# gRPC core logs through absl: "E1129 19:05:49.490981   31617 file.cc:2563] message".
_ABSL_LINE = re.compile(r"([IWEF])\d{4} [\d:.]+\s+\d+\s+([^\]\s]+)\] ?(.*)")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


class StderrToJson:
    """Puts a pipe on file descriptor 2 and writes each line that arrives there to the real
    stderr as a JSON object: gRPC core's lines under logger ``grpc`` at their own level (and
    dropped below the configured level), anything else under ``stderr`` as a warning.

    ``start()`` returns a stream on the real stderr for the logging handler, whose lines
    must not take the detour; ``stop()`` puts the real stderr back and writes what is left.
    """

    def __init__(self) -> None:
        self._real_fd = -1
        self._pump: threading.Thread | None = None
        self._formatter = JsonFormatter()

    def start(self) -> TextIO:
        sys.stderr.flush()
        self._real_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._pump = threading.Thread(
            target=self._run, args=(read_fd,), name="lmserve-stderr", daemon=True
        )
        self._pump.start()
        # Line-buffered and never closed: the logging handler writes to it until exit.
        return open(
            os.dup(self._real_fd), "w", encoding="utf-8", errors="backslashreplace", buffering=1
        )

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._pump is None:
            return
        sys.stderr.flush()
        os.dup2(self._real_fd, 2)  # closes the pipe's last write end: the pump reads EOF
        self._pump.join(timeout_s)
        self._pump = None

    def _run(self, read_fd: int) -> None:
        with open(read_fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "backslashreplace").rstrip()
                record = self._record(line) if line else None
                if record is None:
                    continue
                try:
                    os.write(self._real_fd, (self._formatter.format(record) + "\n").encode())
                except OSError:
                    return  # nowhere to write; the pipe still drains so writers never block

    @staticmethod
    def _record(line: str) -> logging.LogRecord | None:
        absl = _ABSL_LINE.fullmatch(line)
        name, level, fields = "stderr", logging.WARNING, {}
        if absl is not None:
            name, level, line = "grpc", _ABSL_LEVELS[absl.group(1)], absl.group(3)
            fields = {"source": absl.group(2)}
        if not logging.getLogger(name).isEnabledFor(level):
            return None
        return logging.makeLogRecord(
            {
                "name": name,
                "levelno": level,
                "levelname": logging.getLevelName(level),
                "msg": line,
                "created": time.time(),
                **fields,
            }
        )


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Sends every log record to ``stream`` (stderr) at ``level`` and above, in ``fmt``."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
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
