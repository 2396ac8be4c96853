"""
What the proxy tells operators: the access log, one line per request or
tunnel, and the Prometheus metrics.

The access log is a L{twisted.logger} publisher of its own, so its lines go
only where the operator sent them (a file or standard output), as text or
as one JSON object a line, and never mix with the process log's format.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import values as prometheusValues
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from twisted.logger import (
    ILogObserver,
    Logger,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.compat import ioType
from twisted.web.resource import Resource
from zope.interface import implementer

from proxy_app.reasons import DENIALS

log = Logger()

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


# The fields of Smokescreen's canonical decision lines.
DECISION_FIELDS = (
    "msg",
    "id",
    "proxy_type",
    "requested_host",
    "role",
    "project",
    "decision_reason",
    "address_rule",
    "enforce_would_deny",
    "allow",
    "report_only",
    "inbound_remote_addr",
    "outbound_remote_addr",
    "dns_lookup_time_ms",
    "conn_establish_time_ms",
    "status_code",
    "bytes_in",
    "bytes_out",
    "duration",
    "end_time",
    "error",
)


# A value with one of these is quoted (as JSON), like an empty or
# unprintable one.
_NEEDS_QUOTES = re.compile(r'[ "=\\]').search


def _textValue(value: Any) -> str:
    kind = type(value)
    if kind is int or kind is float:
        # Digits, a sign, a dot, "e", "inf" or "nan": never quoted.
        return str(value)
    if kind is bool:
        return "true" if value else "false"
    text = value if kind is str else str(value)
    if text and text.isprintable() and _NEEDS_QUOTES(text) is None:
        return text
    return json.dumps(text)


# Fields whose values repeat from line to line (a method, a host, a
# reason): their formatted text is remembered, up to _CACHED values each.
_REPEATING = frozenset(
    {
        "method",
        "url",
        "error",
        "role",
        "client_cn",
        "client_ou",
        "msg",
        "proxy_type",
        "requested_host",
        "project",
        "decision_reason",
        "address_rule",
        "outbound_remote_addr",
    }
)
_CACHED = 256


def _fieldCode(fields: tuple[str, ...], value: Callable[[str], str]) -> list[str]:
    """
    Lines of Python appending C{name=value} to C{parts} (through C{add})
    for each of C{fields} that is not L{None}, as L{_textValue} writes the
    value: a string that needs no quoting, an int or a float as it is, a
    bool as C{true} or C{false}.

    @param value: gives the expression of a field's value, from its name.
    """
    source = ["    parts = []", "    add = parts.append"]
    for name in fields:
        if not name.isidentifier():
            raise ValueError(f"not a field name: {name!r}")
        prefix = repr(name + "=")
        source += [
            f"    value = {value(name)}",
            "    if value is not None:",
            "        kind = type(value)",
        ]
        if name in _REPEATING:
            source += [
                "        if kind is str:",
                f"            text = cache_{name}.get(value)",
                "            if text is None:",
                "                if value and value.isprintable() and "
                "needsQuotes(value) is None:",
                f"                    text = {prefix} + value",
                "                else:",
                f"                    text = {prefix} + textValue(value)",
                f"                if len(cache_{name}) >= {_CACHED}:",
                f"                    cache_{name}.clear()",
                f"                cache_{name}[value] = text",
                "            add(text)",
            ]
        else:
            source += [
                "        if kind is str and value and value.isprintable() and "
                "needsQuotes(value) is None:",
                f"            add({prefix} + value)",
            ]
        # As _textValue has it, without the call.
        source += [
            "        elif kind is int or kind is float:",
            f"            add({prefix} + str(value))",
            "        elif kind is bool:",
            f"            add({prefix} + ('true' if value else 'false'))",
            "        else:",
            f"            add({prefix} + textValue(value))",
        ]
    source.append("    line = ' '.join(parts) + '\\n'")
    return source


def _compile(
    source: list[str], name: str, fields: tuple[str, ...], **names: Any
) -> Any:
    namespace: dict[str, Any] = {
        "textValue": _textValue,
        "needsQuotes": _NEEDS_QUOTES,
        **names,
    }
    for field in fields:
        if field in _REPEATING:
            namespace[f"cache_{field}"] = {}
    exec("\n".join(source), namespace)
    return namespace[name]


def textFormatter(fields: tuple[str, ...]) -> Any:
    """
    A formatter writing C{fields} of an event as C{key=value} pairs
    (logfmt), quoting values that need it.

    It runs once per request for each log, so its code is written out for
    C{fields} (no loop over names; see L{_fieldCode}).
    """
    source = ["def formatText(event):", "    get = event.get"]
    source += _fieldCode(fields, lambda name: f"get({name!r})")
    source.append("    return line")
    return _compile(source, "formatText", fields)


def textRows(
    fields: tuple[str, ...],
    system: str | None = None,
    stamp: Callable[[float], str] | None = None,
) -> Callable[[list[Any]], str]:
    """
    A function writing a batch of lines: each item a string (written as it
    is), or a row of C{fields}' values (what L{textRecorder} keeps),
    formatted as L{textFormatter} does.  With C{system}, a row begins with
    the time of its event, and its line is the process log's:
    C{stamp(time) + " [system] " + text}.

    Lines are formatted here, a batch at a time, rather than one per
    request: the same code runs over many rows while it is warm.
    """
    names = ", ".join(fields)
    shapes: dict[tuple[type, ...], Any] = {}
    source = [
        "def render(items):",
        "    out = []",
        "    emit = out.append",
        "    shaped = last[0]",
        "    for item in items:",
        "        if item.__class__ is str:",
        "            emit(item)",
        "            continue",
        # The shape of the row before, usually this row's too.
        "        text = shaped(item)",
        "        if text is MISS:",
        "            shape = tuple(map(type, item))",
        "            shaped = shapes.get(shape)",
        "            if shaped is None:",
        "                shaped = newShape(shape)",
        "            text = shaped(item)",
        "        if text.__class__ is str:",
        "            emit(text)",
        "            continue",
        f"        {'when, ' if system else ''}{names}, = item",
    ]
    source += ["    " + line for line in _fieldCode(fields, lambda name: name)]
    if system is not None:
        source.append(f"        emit(stamp(when) + {' [' + system + '] '!r} + line)")
    else:
        source.append("        emit(line)")
    source.append("    last[0] = shaped")
    source.append("    return ''.join(out)")

    def newShape(shape: tuple[type, ...]) -> Any:
        line = _shapeLine(fields, system, stamp, shape)
        if len(shapes) < _SHAPES:
            shapes[shape] = line
        return line

    return cast(
        Callable[[list[Any]], str],
        _compile(
            source,
            "render",
            fields,
            stamp=stamp,
            shapes=shapes,
            newShape=newShape,
            MISS=_MISS,
            last=[_noLine],
        ),
    )


# Shapes of rows (the types of their values) with a line function each,
# per log: a handful in practice.
_SHAPES = 64


def _filler(name: str, cache: dict[Any, str]) -> Callable[[Any], str]:
    """
    A function giving C{name=value} as a line shows it (quoted if need
    be), and remembering it in C{cache} (at most L{_CACHED} values).
    """
    prefix = name + "="

    def fill(value: Any) -> str:
        if value.__class__ is int:
            text = prefix + str(value)
        elif value and value.isprintable() and _NEEDS_QUOTES(value) is None:
            text = prefix + value
        else:
            text = prefix + _textValue(value)
        if len(cache) >= _CACHED:
            cache.clear()
        cache[value] = text
        return text

    return fill


# What a shape's line function returns for a row of another shape.
_MISS = object()


def _noLine(item: tuple[Any, ...]) -> object:
    return _MISS


def _shapeLine(
    fields: tuple[str, ...],
    system: str | None,
    stamp: Callable[[float], str] | None,
    shape: tuple[type, ...],
) -> Callable[[tuple[Any, ...]], object]:
    """
    A function writing the line of a row whose values have the types of
    C{shape} (as L{textRows}'s general code writes it) with one C{%}
    format for the whole line; returning L{None} when a string of the row
    needs quoting (or is empty): then the general code writes it; and
    L{_MISS} for a row of another shape (its types are checked first, so
    L{textRows} can try the shape of the row before without computing
    this row's).

    Fields that are L{None} are left out of the format, floats are
    written by C{%s} (their C{str}), bools as C{true} or C{false}; the
    texts of ints and of repeating strings (L{_REPEATING}) are remembered
    per value (L{_filler}); the row's other strings are checked together
    (one C{isprintable}, and C{in} for each character that needs quoting,
    over their concatenation).  A shape with a value of any other type (a
    subclass of C{str}, say) has no such function: its rows take the
    general code.
    """
    offset = 1 if system is not None else 0
    if len(shape) != len(fields) + offset:
        return _noLine
    names = [f"v{index}" for index in range(len(shape))]
    pieces: list[str] = []
    values: list[str] = []
    strings: list[str] = []
    checks: list[str] = []
    caches: dict[str, Any] = {}
    if system is not None:
        if shape[0] is not float:
            return _noLine
        checks.append("v0.__class__ is not float")
        values.append("stamp(v0)")
    for index, (name, kind) in enumerate(
        zip(fields, shape[offset:], strict=True), offset
    ):
        if not name.isidentifier():
            raise ValueError(f"not a field name: {name!r}")
        value = names[index]
        if kind is type(None):
            checks.append(f"{value} is not None")
            continue
        if kind not in (str, int, float, bool):
            return _noLine
        checks.append(f"{value}.__class__ is not {kind.__name__}")
        if (kind is str and name in _REPEATING) or kind is int:
            # "name=value" as it is written, remembered per value.
            cache: dict[Any, str] = {}
            caches[f"cache_{name}"] = cache
            caches[f"fill_{name}"] = _filler(name, cache)
            pieces.append("%s")
            values.append(f"(cache_{name}.get({value}) or fill_{name}({value}))")
            continue
        if kind is str:
            strings.append(value)
        elif kind is bool:
            value = f"('true' if {value} else 'false')"
        pieces.append(name + "=%s")
        values.append(value)
    text = " ".join(pieces) + "\n"
    if system is not None:
        text = "%s " + ("[" + system + "] ").replace("%", "%%") + text
    source = [
        "def line(item):",
        f"    {', '.join(names)}, = item",
        f"    if {' or '.join(checks)}:",
        "        return MISS",
    ]
    if strings:
        source += [
            f"    if not ({' and '.join(strings)}):",
            "        return None",
            f"    text = {' + '.join(strings)}",
            "    if (",
            "        not text.isprintable()",
            "        or ' ' in text",
            "        or '\"' in text",
            "        or '=' in text",
            "        or '\\\\' in text",
            "    ):",
            "        return None",
        ]
    source.append(f"    return {text!r} % ({''.join(v + ', ' for v in values)})")
    namespace: dict[str, Any] = {"MISS": _MISS, "stamp": stamp}
    namespace.update(caches)
    exec("\n".join(source), namespace)
    return cast(Callable[[tuple[Any, ...]], object], namespace["line"])


def textRecorder(
    fields: tuple[str, ...],
    slow: Callable[..., None],
    slowWhen: Callable[[], bool],
    write: Callable[[tuple[Any, ...]], None],
    now: Callable[[], float] | None = None,
) -> Callable[..., None]:
    """
    A function taking C{fields} as keyword arguments (each L{None} by
    default) that passes their values, as a row in C{fields}' order (after
    C{now()}, if given), to C{write}, for L{textRows} to format; or, when
    C{slowWhen()} is true, passes them on to C{slow}.  It is what the
    proxy calls once per request for each log, with no dictionary of
    fields built on the way, and no formatting.
    """
    signature = ", ".join(f"{name}=None" for name in fields)
    passOn = ", ".join(f"{name}={name}" for name in fields)
    row = ("now(), " if now is not None else "") + ", ".join(fields) + ","
    source = [
        f"def record({signature}):",
        "    if slowWhen():",
        f"        return slow({passOn})",
        f"    write(({row}))",
    ]
    namespace: dict[str, Any] = {
        "slow": slow,
        "slowWhen": slowWhen,
        "write": write,
        "now": now,
    }
    exec("\n".join(source), namespace)
    return cast(Callable[..., None], namespace["record"])


def jsonFormatter(fields: tuple[str, ...]) -> Any:
    """
    A formatter writing C{fields} of an event as one JSON object, with the
    event's time.
    """

    def formatJSON(event: Mapping[str, Any]) -> str:
        record = {name: event[name] for name in fields if event.get(name) is not None}
        record["time"] = event.get("log_time")
        return json.dumps(record, separators=(",", ":")) + "\n"

    return formatJSON


class LineBuffer:
    """
    Lines on their way to a file, written in batches: one C{write} (and one
    C{flush}) for many lines, never one system call per line.

    Until L{batch} is called, every line is written and flushed at once.
    After it, lines wait in a bounded buffer: it is written out when it
    holds C{maxLines} lines, when C{interval} seconds have passed since the
    first line of the batch (a timer on C{clock}, armed only while
    something waits), and on L{flush} (at shutdown, on reopening).  Writing
    a batch is one call into the file object; nothing waits on the disk in
    a way other code would not (the reactor writes its log files the same
    way).  What waits in the buffer is lost only if the process is killed
    outright (C{SIGKILL}): at most C{interval} seconds or C{maxLines} lines.

    @ivar outFile: the file written to (text, or binary taking UTF-8).
    """

    def __init__(
        self,
        outFile: IO[Any],
        path: str | None = None,
        render: Callable[[list[Any]], str] | None = None,
    ) -> None:
        self.outFile = outFile
        self._path = path
        self._encode = ioType(outFile) is not str
        # Turns what waits (lines, or rows: see textRows) into text.
        self._render = render if render is not None else "".join
        self._lines: list[Any] = []
        self._clock: Any = None
        self._interval = 1.0
        self._maxLines = 256
        self._timer: Any = None

    def batch(self, clock: Any, interval: float = 1.0, maxLines: int = 256) -> None:
        """
        Write lines in batches from now on (see the class).
        """
        self._clock = clock
        self._interval = interval
        self._maxLines = maxLines

    def add(self, line: Any) -> None:
        """
        Write C{line} (which ends with a newline, or a row for the renderer),
        now or with its batch.
        """
        lines = self._lines
        lines.append(line)
        if self._clock is None or len(lines) >= self._maxLines:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._timed)

    def _timed(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """
        Write out what waits, in one write, and flush the file.
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines = self._lines
        self._lines = []
        try:
            text = self._render(lines)
            self.outFile.write(text.encode("utf-8") if self._encode else text)
            self.outFile.flush()
        except (OSError, ValueError) as e:
            log.error(
                "Cannot write log {path}: {error}", path=self._path or "-", error=e
            )


@implementer(ILogObserver)
class _LineObserver:
    """
    Formats events into a L{LineBuffer}: the log's own file, when other
    observers (tests) listen to its events too.
    """

    def __init__(self, sink: LineBuffer, formatter: Any) -> None:
        self.sink = sink
        self._formatter = formatter

    def __call__(self, event: dict[str, Any]) -> None:
        self.sink.add(self._formatter(event))


class LineLog:
    """
    A log of one line per event, with a fixed set of fields, written to a
    file or standard output as text or JSON.

    While the file is the only listener, L{record} keeps the fields' values
    as a row in the file's L{LineBuffer}, which formats its rows a batch at
    a time (L{textRows}; JSON lines are formatted at once); once other
    observers listen (tests), each line is an event of L{publisher}, and
    the file is one observer of it.  The line is the same either way.

    @ivar publisher: the L{LogPublisher} lines are emitted to; tests add
        observers to it.
    """

    fields: tuple[str, ...] = ACCESS_FIELDS
    namespace = "egressproxy.access"

    def __init__(
        self, outFile: IO[str] | None, format: str = "text", path: str | None = None
    ) -> None:
        self.publisher = LogPublisher()
        self._log = Logger(namespace=self.namespace, observer=self.publisher)
        self._json = format == "json"
        self._formatter = (
            jsonFormatter(self.fields) if self._json else textFormatter(self.fields)
        )
        self._path = path
        self._clock: Any = None
        self._interval = 1.0
        self._sink: LineBuffer | None = None
        self._observer: _LineObserver | None = None
        # Observers other than the file.
        self._listeners = 0
        # Nothing is built per event while nobody listens (logs off).
        self.enabled = False
        # What turns rows of text lines into text, in batches.
        self._render = None if self._json else textRows(self.fields)
        if outFile is not None:
            self._attach(LineBuffer(outFile, path, self._render))

    def _slow(self) -> bool:
        return bool(self._listeners)

    def _attach(self, sink: LineBuffer) -> None:
        self._sink = sink
        if self._clock is not None:
            sink.batch(self._clock, self._interval)
        self._observer = _LineObserver(sink, self._formatter)
        self.publisher.addObserver(self._observer)
        self.enabled = True
        if not self._json:
            # Rows go straight into this file's buffer.
            self.record = textRecorder(  # type: ignore[method-assign]
                self.fields, self._record, self._slow, sink.add
            )

    def batchWrites(self, clock: Any, interval: float = 1.0) -> None:
        """
        Write lines in batches (L{LineBuffer.batch}), flushed at the latest
        C{interval} seconds on C{clock} after the first line of a batch (and
        on L{flush}), instead of one write per line.
        """
        self._clock = clock
        self._interval = interval
        if self._sink is not None:
            self._sink.batch(clock, interval)

    def flush(self) -> None:
        """
        Write out what is buffered.
        """
        if self._sink is not None:
            self._sink.flush()

    def stop(self) -> None:
        """
        Write out what is buffered (at shutdown).
        """
        self.flush()

    def addObserver(self, observer: Any) -> None:
        """
        Send this log's events to C{observer} too.
        """
        self.publisher.addObserver(observer)
        self._listeners += 1
        self.enabled = True

    @classmethod
    def open(cls, path: str, format: str) -> Any:
        """
        Open the log at C{path} (C{-} is standard output, C{none} turns it
        off) for appending.
        """
        if path == "-":
            return cls(sys.stdout, format)
        if path.lower() == "none":
            return cls(None, format)
        return cls(open(path, "a", encoding="utf-8"), format, path)

    def reopen(self) -> None:
        """
        Reopen the log file (after logrotate moved it); standard output is
        left alone.
        """
        if self._path is None:
            return
        try:
            newFile = open(self._path, "a", encoding="utf-8")
        except OSError as e:
            log.error("Cannot reopen log {path}: {error}", path=self._path, error=e)
            return
        if self._sink is not None:
            # What waits belongs to the old file.
            self._sink.flush()
            self._sink.outFile.close()
        if self._observer is not None:
            self.publisher.removeObserver(self._observer)
        self._attach(LineBuffer(newFile, self._path, self._render))
        log.info("Reopened log {path}", path=self._path)

    def record(self, **fields: Any) -> None:
        """
        Write one line with the given fields.
        """
        self._record(**fields)

    def _record(self, **fields: Any) -> None:
        if not self._listeners:
            sink = self._sink
            if sink is not None:
                if self._json:
                    fields["log_time"] = time.time()
                sink.add(self._formatter(fields))
        elif self.enabled:
            self._log.info(self.namespace, **fields)


class AccessLog(LineLog):
    """
    The access log: one line per request or tunnel, with webhook-sentry's
    fields.
    """


class DecisionLog(LineLog):
    """
    Smokescreen's canonical decision lines: C{CANONICAL-PROXY-DECISION} for
    each request or tunnel, C{CANONICAL-PROXY-CN-CLOSE} when a tunnel
    closes.  Without a file of its own (L{toProcessLog}) each line goes to
    the process log, with its fields as the event's keys.
    """

    fields = DECISION_FIELDS
    namespace = "egressproxy.decision"

    # The process log's file, when it is ours (L{toProcessLog}).
    _processLog: TextProcessLog | None = None

    @classmethod
    def toProcessLog(cls, processLog: TextProcessLog | None = None) -> DecisionLog:
        """
        Decision lines for the process log.

        @param processLog: the process log's observer, when the process
            log is ours (L{TextProcessLog}): once it is installed, lines
            are formatted once, as its text observer would have written
            them, into its buffer; else (and while others listen) each line
            is an event of the global log publisher.
        """
        decisions = cls(None)
        text = textFormatter(DECISION_FIELDS)
        processLogger = Logger(namespace=cls.namespace)

        def forward(event: dict[str, Any]) -> None:
            fields = {k: event[k] for k in DECISION_FIELDS if k in event}
            processLogger.info("{line}", line=text(event).rstrip("\n"), **fields)

        # The only listener that is not another observer (a test's).
        decisions.addObserver(cast(ILogObserver, forward))
        decisions._processLog = processLog
        if processLog is not None:

            def slow() -> bool:
                return decisions._listeners != 1 or not processLog.installed

            decisions.record = textRecorder(  # type: ignore[method-assign]
                DECISION_FIELDS,
                decisions._record,
                slow,
                processLog.buffer.add,
                processLog.now,
            )
        return decisions

    def batchWrites(self, clock: Any, interval: float = 1.0) -> None:
        LineLog.batchWrites(self, clock, interval)
        if self._processLog is not None:
            self._processLog.batchWrites(clock, interval)

    def flush(self) -> None:
        LineLog.flush(self)
        if self._processLog is not None:
            self._processLog.flush()


# How a decision line's event is shown in the process log's text.
_DECISION_SYSTEM = DecisionLog.namespace + "#info"


@implementer(ILogObserver)
class TextProcessLog:
    """
    The process log in twistd's text format, written as
    L{twisted.logger.textFileLogObserver} would write it (byte for byte:
    C{"{time} [{namespace}#{level}] {text}"}), with savings for a line
    per request: the time stamp is formatted once per second, and decision
    lines wait in L{buffer} without an event, as rows of their fields and
    time (L{DecisionLog.toProcessLog}), to be formatted and written in
    batches (L{textRows}, L{LineBuffer}); L{addLine} adds a line formatted
    by the caller.  Every other event is written at once, after the lines
    that wait, so the order is kept.

    @ivar installed: whether twistd logs to this observer (given a file
        when made, or L{install}ed); until then, decision lines go to the
        global log.
    """

    def __init__(
        self, outFile: IO[Any] | None = None, now: Callable[[], float] = time.time
    ) -> None:
        # Holds lines, and rows of decision lines (textRows).
        self.buffer = LineBuffer(
            outFile if outFile is not None else sys.stdout,
            render=textRows(DECISION_FIELDS, _DECISION_SYSTEM, self.formatTime),
        )
        self.installed = outFile is not None
        # The event's time, as twisted.logger takes it.
        self.now = now
        self._second: int | None = None
        self._stamp = ""

    def install(self, outFile: IO[Any]) -> None:
        """
        Write to C{outFile} from now on; twistd logs to this observer.
        """
        self.buffer.flush()
        self.buffer.outFile = outFile
        self.buffer._encode = ioType(outFile) is not str
        self.installed = True

    def formatTime(self, when: float | None) -> str:
        """
        L{twisted.logger.formatTime} in RFC 3339, remembered per second.
        """
        if when is None:
            return "-"
        second = int(when)
        if when - second >= 0.9999995:
            # Rounded up to the next second by datetime: not cached.
            return formatTime(when)
        if second != self._second:
            self._stamp = formatTime(second)
            self._second = second
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(event, formatTime=self.formatTime)
        if text:
            self.buffer.add(text)
            self.buffer.flush()

    def addLine(self, system: str, text: str) -> None:
        """
        Log C{text} (one line, ending with a newline) now, as an event of
        C{system} (C{namespace#level}) whose text it is.
        """
        self.buffer.add(f"{self.formatTime(self.now())} [{system}] {text}")

    def batchWrites(self, clock: Any, interval: float = 1.0) -> None:
        """
        Batch the lines of L{addLine} (L{LineBuffer.batch}).
        """
        self.buffer.batch(clock, interval)

    def flush(self) -> None:
        """
        Write out what waits.
        """
        self.buffer.flush()


# Metrics.

# Reason codes that mean the proxy said no, as opposed to a destination
# that failed.
DENIAL_CODES = frozenset(int(reason) for reason in DENIALS)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def multiprocessValues() -> bool:
    """
    Whether prometheus-client keeps metric values in its multiprocess mode's
    files (C{PROMETHEUS_MULTIPROC_DIR} was set when it was imported), as in
    a worker of C{--workers}.
    """
    return bool(getattr(prometheusValues.ValueClass, "_multiprocess", False))


class Metrics:
    """
    The proxy's Prometheus metrics, in an injected registry.

    Labels are kept low in cardinality: no host names and no client
    addresses.  Roles are bounded by the ACL file, so they may label.

    In a worker of C{--workers} (C{multiprocess}), the counters, histograms
    and gauges write their values to prometheus-client's multiprocess files,
    which the supervisor reads (L{instanceRegistry}); gauges are summed over
    the live workers there.  What collectors read at scrape time in one
    process (garbage collection, the webhook's counters and queue) cannot be
    read from another, so the worker copies it into such files every second
    (L{syncMirror}); the process metrics the supervisor reads from C{/proc}
    for every worker itself.

    @ivar mirrored: the registry of the collectors L{syncMirror} copies.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        process: bool = True,
        multiprocess: bool = False,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess
        self.mirrored = CollectorRegistry(auto_describe=False)
        self._mirror = _Mirror(self.mirrored)
        r = self.registry
        if multiprocess:
            GCCollector(registry=self.mirrored)
        elif process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.requests = Counter(
            "egressproxy_requests",
            "Forwarded requests and CONNECT tunnels, by outcome: decision is "
            "deny (the proxy refused), report (allowed by an ACL rule in "
            "report mode that enforce would deny) or allow.",
            ["proxy_type", "decision", "reason_code"],
            registry=r,
        )
        # With --workers, the instance's value is the sum over the workers
        # alive (multiprocess_mode has no effect in one process).
        self.connections = Gauge(
            "egressproxy_active_client_connections",
            "Open client connections, per listener.",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._listenerConnections: dict[str, Any] = {}
        self.tunnels = Gauge(
            "egressproxy_active_tunnels",
            "Established CONNECT tunnels.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # What /healthcheck's 503 says, as a sample: alerts and dashboards
        # see a drain (and one that does not end) without probing.
        self.draining = Gauge(
            "egressproxy_draining",
            "1 from SIGTERM until the process exits (new requests are refused, "
            "in-flight ones finish), else 0.",
            registry=r,
            # Under --workers: draining if any worker is.
            multiprocess_mode="max",
        )
        self.bytes = Counter(
            "egressproxy_bytes",
            "Payload bytes relayed: up is client to destination, down the reverse.",
            ["direction"],
            registry=r,
        )
        self._bytesUp = self.bytes.labels("up")
        self._bytesDown = self.bytes.labels("down")
        self._requestChildren: dict[tuple[str, int | None, bool], Any] = {}
        self.connectTime = Histogram(
            "egressproxy_upstream_connect_seconds",
            "Time to connect to the destination (TLS handshake included).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dnsTime = Histogram(
            "egressproxy_dns_lookup_seconds",
            "Time to resolve a destination name (IP literals are not counted).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.resolverDenials = Counter(
            "egressproxy_resolver_denials",
            "Destination addresses the address policy refused, by rule.",
            ["rule"],
            registry=r,
        )
        self.gateLatency = Histogram(
            "egressproxy_access_request_seconds",
            "Time the access-request gate took to decide.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.gateOutcomes = Counter(
            "egressproxy_access_request_outcomes",
            "Access-request gate outcomes: accept or reject.",
            ["outcome"],
            registry=r,
        )
        self.reloadFailures = Counter(
            "egressproxy_reload_failures",
            "Reloads (SIGHUP, or a watched file that changed) whose files did "
            "not load, by part: acl, credentials, listener (a TLS listener's "
            "certificate, key, client CA or CRL), origination (the trust root "
            "and client certificates), destinations (the configuration file's "
            "destination rules); the old state stays in force.",
            ["what"],
            registry=r,
        )
        self.authFailures = Counter(
            "egressproxy_proxy_auth_failures",
            "Requests with wrong or malformed proxy credentials (missing "
            "credentials are not counted).",
            registry=r,
        )
        self.aclDecisions = Counter(
            "egressproxy_acl_decisions",
            "ACL decisions by the rule that matched (a service name or "
            "default), its project, and the outcome: allow, report (allowed, "
            "enforce would deny) or deny.",
            ["rule", "project", "decision"],
            registry=r,
        )
        self.tlsFailures = Counter(
            "egressproxy_tls_origination_failures",
            "Failed TLS originations, by kind: handshake, certificate, timeout.",
            ["kind"],
            registry=r,
        )

    def watchWebhook(self, webhook: Any) -> None:
        """
        Export the webhook's delivery counters and queue depth.
        """
        collector = _WebhookCollector(webhook)
        self.registry.register(collector)
        if self.multiprocess:
            self.mirrored.register(collector)

    def syncMirror(self) -> None:
        """
        Copy what the L{mirrored} collectors say now into the multiprocess
        files, for the supervisor's scrapes.
        """
        self._mirror.sync()

    def listenerConnections(self, listener: str) -> Any:
        """
        The gauge of open client connections on C{listener}, looked up once.
        """
        gauge = self._listenerConnections.get(listener)
        if gauge is None:
            gauge = self._listenerConnections[listener] = self.connections.labels(
                listener
            )
        return gauge

    def requestDone(
        self,
        proxyType: str,
        reasonCode: int | None,
        bytesUp: int,
        bytesDown: int,
        report: bool = False,
    ) -> None:
        """
        Count one finished request or tunnel.

        @param report: it went through under an ACL rule in report mode
            that enforce mode would have denied.
        """
        key = (proxyType, reasonCode, report)
        child = self._requestChildren.get(key)
        if child is None:
            if reasonCode in DENIAL_CODES:
                decision = "deny"
            else:
                decision = "report" if report else "allow"
            # A handful of label sets, looked up once each: labels() takes
            # a lock and validates every time.
            child = self._requestChildren[key] = self.requests.labels(
                proxyType, decision, str(reasonCode or "")
            )
        child.inc()
        if bytesUp:
            self._bytesUp.inc(bytesUp)
        if bytesDown:
            self._bytesDown.inc(bytesDown)


class _Mirror:
    """
    Copies the families of a registry's scrape-time collectors into metrics
    of prometheus-client's multiprocess mode: a counter is raised by what
    it grew since the last copy, a gauge is set (and summed over the live
    workers by the supervisor).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._metrics: dict[str, Any] = {}
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._copied: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def sync(self) -> None:
        for family in self.registry.collect():
            if family.type not in ("counter", "gauge"):
                continue
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_total"):
                    # _created: the supervisor's sums have none.
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._child(family, sample.labels)
                if family.type == "gauge":
                    child.set(sample.value)
                    continue
                grown = sample.value - self._copied.get(key, 0.0)
                if grown > 0:
                    child.inc(grown)
                    self._copied[key] = sample.value

    def _child(self, family: Metric, labels: Mapping[str, str]) -> Any:
        metric = self._metrics.get(family.name)
        if metric is None:
            names = sorted(labels)
            if family.type == "counter":
                metric = Counter(
                    family.name, family.documentation, names, registry=None
                )
            else:
                metric = Gauge(
                    family.name,
                    family.documentation,
                    names,
                    registry=None,
                    multiprocess_mode="livesum",
                )
            self._metrics[family.name] = metric
        return metric.labels(**labels) if labels else metric


class _WorkerProcesses(Collector):
    """
    The C{process_*} metrics of the supervisor and of every worker, read
    from C{/proc}, each labelled C{worker} (C{supervisor}, C{0}, C{1}, ...):
    a file-descriptor limit or a memory size means something per process,
    and C{sum} gives the instance's.
    """

    def __init__(self, processes: Callable[[], Mapping[str, int]]) -> None:
        self._processes = processes
        self._collectors: dict[int | str, ProcessCollector] = {}

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        wanted: dict[str, int | str] = {"supervisor": "self"}
        wanted.update(self._processes())
        collectors = {}
        for name, pid in wanted.items():
            collector = self._collectors.get(pid)
            if collector is None:
                collector = ProcessCollector(pid=_constant(pid), registry=None)
            collectors[pid] = collector
            for family in collector.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    merged.add_sample(
                        sample.name, {**sample.labels, "worker": name}, sample.value
                    )
        # Ended workers' collectors go.
        self._collectors = collectors
        yield from families.values()


def _constant(value: int | str) -> Callable[[], int | str]:
    return lambda: value


class _WorkerFiles(Collector):
    """
    The sums of what the workers wrote in prometheus-client's multiprocess
    files, in the directory C{directory()} names (none: nothing).
    """

    def __init__(self, directory: Callable[[], str | None]) -> None:
        self._directory = directory

    def collect(self) -> Iterator[Metric]:
        path = self._directory()
        if path is None:
            return
        try:
            yield from MultiProcessCollector.merge(
                glob.glob(os.path.join(path, "*.db")), accumulate=True
            )
        except FileNotFoundError:
            # The directory went while the supervisor stops.
            return


def instanceRegistry(
    directory: Callable[[], str | None], processes: Callable[[], Mapping[str, int]]
) -> CollectorRegistry:
    """
    The registry the supervisor of C{--workers} serves: the proxy's metrics
    summed over its workers, and the process metrics of every process.

    @param directory: gives the directory the workers write their metrics
        in, or L{None}.
    @param processes: gives the process id of each running worker, by index.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerFiles(directory))
    registry.register(_WorkerProcesses(processes))
    PlatformCollector(registry=registry)
    return registry


class _WebhookCollector(Collector):
    """
    Reads the webhook service's counters at scrape time.
    """

    def __init__(self, webhook: Any) -> None:
        self.webhook = webhook

    def collect(self) -> Any:
        events = CounterMetricFamily(
            "egressproxy_webhook_events",
            "Control-webhook POSTs by outcome: sent (2xx), failed (given up), "
            "dropped (queue full or left at shutdown).",
            labels=["outcome"],
        )
        for outcome in ("sent", "failed", "dropped"):
            events.add_metric([outcome], getattr(self.webhook, outcome))
        yield events
        yield GaugeMetricFamily(
            "egressproxy_webhook_queue_depth",
            "Events waiting to be sent, being retried or in flight.",
            value=self.webhook.queueDepth,
        )


class MetricsResource(Resource):
    """
    C{/metrics} in Prometheus' text format; C{/healthcheck}, which answers
    503 while the proxy drains (for readiness and load balancers); and
    C{/livez}, which answers 200 whenever the reactor serves it, draining
    or not (for a liveness probe, which must not kill a draining proxy).

    @ivar healthy: a callable saying whether the proxy accepts connections.
    @ivar reason: a callable giving the body of a 503, in a few words.
    """

    isLeaf = True

    def __init__(
        self,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        reason: Callable[[], str | None] | None = None,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.healthy = healthy
        self.reason = reason

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/metrics":
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            return generate_latest(self.registry)
        if request.path == b"/healthcheck":
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            if self.healthy():
                return b"ok\n"
            request.setResponseCode(503)
            reason = (self.reason() if self.reason is not None else None) or "draining"
            return reason.encode("utf-8") + b"\n"
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if request.path == b"/livez":
            return b"alive\n"
        request.setResponseCode(404)
        return b"not found: try /metrics, /healthcheck or /livez\n"
