"""
What the proxy tells operators: the access log, one line per request or
tunnel.

The access log is a L{twisted.logger} publisher of its own, so its lines go
only where the operator sent them (a file or standard output), as text or
as one JSON object a line, and never mix with the process log's format.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, Logger, LogPublisher

# The fields of an access-log line, in the order text lines show them.
# The first six are webhook-sentry's.
ACCESS_FIELDS = (
    "rq_id",
    "client_addr",
    "method",
    "url",
    "response_code",
    "response_time",
    "bytes_up",
    "bytes_down",
    "reason_code",
    "error",
    "role",
    "client_cn",
    "client_ou",
)


def _textValue(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def formatText(event: dict[str, Any]) -> str:
    """
    Format an access event as C{key=value} pairs (logfmt), quoting values
    that need it.
    """
    parts = []
    for name in ACCESS_FIELDS:
        value = event.get(name)
        if value is None:
            continue
        parts.append(f"{name}={_textValue(value)}")
    return " ".join(parts) + "\n"


def formatJSON(event: dict[str, Any]) -> str:
    """
    Format an access event as one JSON object.
    """
    record = {name: event[name] for name in ACCESS_FIELDS if event.get(name) is not None}
    record["time"] = event.get("log_time")
    return json.dumps(record, separators=(",", ":")) + "\n"


class AccessLog:
    """
    Writes access-log lines.

    @ivar publisher: the L{LogPublisher} lines are emitted to; tests add
        observers to it.
    """

    def __init__(self, outFile: IO[str] | None, format: str = "text") -> None:
        self.publisher = LogPublisher()
        self._log = Logger(namespace="egressproxy.access", observer=self.publisher)
        if outFile is not None:
            formatter = formatJSON if format == "json" else formatText
            self.publisher.addObserver(FileLogObserver(outFile, formatter))

    @classmethod
    def open(cls, path: str, format: str) -> AccessLog:
        """
        Open the access log at C{path} (C{-} is standard output) for
        appending.
        """
        if path == "-":
            return cls(sys.stdout, format)
        return cls(open(path, "a", buffering=1, encoding="utf-8"), format)

    def record(self, **fields: Any) -> None:
        """
        Write one line with the given L{ACCESS_FIELDS}.
        """
        self._log.info("access", **fields)
