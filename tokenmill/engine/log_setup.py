"""Log lines as text, or as one JSON object each (`--log-format json`), alike in every process of a server:
the API process configures itself, and hands the same LogSettings to the engine and tensor-parallel processes."""
from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
from dataclasses import dataclass

# Attributes every LogRecord has; anything else on a record came through `extra=` and goes into its JSON.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, process tag, message, the record's
    `extra` fields, and the traceback as one string."""

    def __init__(self, tag: str | None = None):
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.tag:
            line["process"] = self.tag
        line.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


@dataclass(frozen=True)
class LogSettings:
    """How a process logs: its level, and text or JSON lines."""

    level: int = logging.INFO
    json: bool = False

    @classmethod
    def current(cls) -> LogSettings:
        """This process's settings, as configure() left them (child processes are given these)."""
        root = logging.getLogger()
        return cls(root.getEffectiveLevel(), any(isinstance(h.formatter, JsonFormatter) for h in root.handlers))

    def configure(self, tag: str | None = None) -> None:
        """Replace the root logger's handlers with one on stderr in this format; tag names the process
        ("engine", "tp1") in each line."""
        handler = logging.StreamHandler()
        where = f" [{tag}]" if tag else ""
        handler.setFormatter(JsonFormatter(tag) if self.json
                             else logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s"))
        logging.basicConfig(level=self.level, handlers=[handler], force=True)
        logging.captureWarnings(True)  # warnings.warn() from libraries goes through the same format
        if self.json:  # and so do tracebacks nothing caught, which Python would print raw
            sys.excepthook = _log_uncaught
            threading.excepthook = lambda a: _log_uncaught(a.exc_type, a.exc_value, a.exc_traceback, a.thread)


def _log_uncaught(kind: type, value: BaseException, tb: object, thread: threading.Thread | None = None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, tb)
    where = f" in thread {thread.name}" if thread else ""
    logging.getLogger("tokenmill").critical("uncaught exception%s", where, exc_info=(kind, value, tb))
