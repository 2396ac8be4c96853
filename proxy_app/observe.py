"""
What the proxy tells operators: the access log, one line per request or
tunnel, and the Prometheus metrics.

The access log is a L{twisted.logger} publisher of its own, so its lines go
only where the operator sent them (a file or standard output), as text or
as one JSON object a line, and never mix with the process log's format.
"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any, cast

import attr
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


# A value that needs no quotes and is not empty, in one match: what
# request ids are made of (channel._REQUEST_ID, but "=").
_PLAIN_ID = re.compile(r"[A-Za-z0-9._:/+@-]+\Z").match


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


# How L{lineWriter} takes each field's value, by kind:
#   "text": a string that repeats from line to line (its text remembered);
#   "id": a string unlikely to repeat (checked each time);
#   "method": the bytes of a request's method, shown decoded;
#   "int": an int that repeats (a status, a reason code); "count": one that
#   does not (byte counts);
#   "bool";
#   "float": shown as it is; "round6": seconds, shown as round(v, 6);
#   "ms": seconds, shown in milliseconds as round(v * 1000, 3).
# Each may also be None (the field is left out of the line).
ACCESS_KINDS = (
    "id",  # rq_id
    "text",  # client_addr
    "method",  # method
    "text",  # url
    "int",  # response_code
    "round6",  # response_time
    "count",  # bytes_up
    "count",  # bytes_down
    "int",  # reason_code
    "text",  # error
    "text",  # role
    "text",  # client_cn
    "text",  # client_ou
)

DECISION_KINDS = (
    "text",  # msg
    "id",  # id
    "text",  # proxy_type
    "text",  # requested_host
    "text",  # role
    "text",  # project
    "text",  # decision_reason
    "text",  # address_rule
    "bool",  # enforce_would_deny
    "bool",  # allow
    "bool",  # report_only
    "text",  # inbound_remote_addr
    "text",  # outbound_remote_addr
    "ms",  # dns_lookup_time_ms
    "ms",  # conn_establish_time_ms
    "int",  # status_code
    "count",  # bytes_in
    "count",  # bytes_out
    "round6",  # duration
    "float",  # end_time
    "text",  # error
)


# The fixed-point formats of _decimal.
_FIXED = {3: "%.3f", 6: "%.6f"}


def _decimal(value: float, places: int) -> str:
    """
    C{str(round(value, places))}, for a float, at about half the cost:
    C{"%.Nf"} gives the same correctly rounded digits as C{round}, and for
    a value of at most 15 significant digits that is zero or not below
    1e-4 (where C{repr} turns to an exponent) the shortest text of the
    rounded float is those digits without trailing zeros.
    """
    if 1e-4 <= value < 1e8 or value == 0.0:
        text = (_FIXED[places] % value).rstrip("0")
        return text + "0" if text[-1] == "." else text
    return str(round(value, places))


def _piece(name: str, kind: str, value: Any) -> str:
    """
    The text of one field in a line (C{" name=value"}, or nothing for
    L{None}), as L{textFormatter} writes the value L{_shown} makes.
    """
    if value is None:
        return ""
    if value.__class__ is bytes and kind == "method":
        value = value.decode("ascii", "replace")
    if value.__class__ is str and value.isprintable() and value:
        if _NEEDS_QUOTES(value) is None:
            return " " + name + "=" + value
    return " " + name + "=" + _textValue(_shown(kind)(value))


# Kinds whose values repeat from line to line and are never equal to a
# value of another kind's type (unlike 1, 1.0 and True): their texts are
# remembered by value, a run of such fields together.
_REMEMBERED = {"text": str, "method": bytes}


def _run(
    names: list[str], kinds: list[str]
) -> tuple[dict[Any, str], Callable[[tuple[Any, ...]], str]]:
    """
    A bounded memory of the text of a run of fields of L{_REMEMBERED}
    kinds, by their values, and the function adding one: only values of
    the kinds' own types (or L{None}) are remembered.
    """
    cache: dict[Any, str] = {}
    owns = [_REMEMBERED[kind] for kind in kinds]

    def fill(values: tuple[Any, ...]) -> str:
        text = "".join(
            _piece(name, kind, value)
            for name, kind, value in zip(names, kinds, values, strict=True)
        )
        if all(
            value is None or value.__class__ is own
            for own, value in zip(owns, values, strict=True)
        ):
            if len(cache) >= _CACHED:
                cache.clear()
            cache[values] = text
        return text

    return cache, fill


def _heads(
    stamp: Callable[[float], str], system: str, last: list[Any]
) -> Callable[[float], str]:
    """
    The function giving the head of a process-log line at C{when}
    (C{stamp(when) + " [system]"}), remembering it in C{last} for the
    rest of that second: C{[from, until, head]}.
    """
    suffix = " [" + system + "]"

    def newHead(when: float) -> str:
        head = stamp(when) + suffix
        second = float(int(when))
        # As formatTime: from here on datetime rounds to the next second.
        until = second + 0.9999995
        if second <= when < until:
            last[:] = [second, until, head]
        return head

    return newHead


def _intFiller(name: str, cache: dict[int, str]) -> Callable[[int], str]:
    """
    The function adding an int's text (C{" name=value"}) to C{cache}, a
    bounded memory.
    """
    prefix = " " + name + "="

    def fill(value: int) -> str:
        if len(cache) >= _CACHED:
            cache.clear()
        text = cache[value] = prefix + str(value)
        return text

    return fill


def _shown(kind: str) -> Callable[[Any], Any]:
    """
    What a value of C{kind} is, as a field of L{LineLog.record} (the value
    a line shows, and a JSON line holds).
    """
    if kind == "method":
        return lambda v: v.decode("ascii", "replace") if v.__class__ is bytes else v
    if kind == "round6":
        return lambda v: round(v, 6) if v.__class__ in (int, float) else v
    if kind == "ms":
        return lambda v: round(v * 1000, 3) if v.__class__ in (int, float) else v
    return lambda v: v


def lineWriter(
    fields: tuple[str, ...],
    kinds: tuple[str, ...],
    stamp: Callable[[float], str] | None = None,
    now: Callable[[], float] | None = None,
    system: str = "",
    sources: Sequence[str] | None = None,
    setup: Sequence[str] = (),
    arguments: str = "",
    names: Mapping[str, Any] | None = None,
) -> Callable[..., str]:
    """
    A function returning the line of C{fields}' values (taken as
    C{kinds} says: see L{ACCESS_KINDS}) as L{textFormatter} writes it from
    the values L{_shown} makes of them; with C{stamp}, the process log's
    line: C{stamp(now()) + " [system] " + text}.

    Without C{sources}, it takes the values positionally.  With them, it
    takes C{arguments} (Python parameters) and each value is the
    expression of C{sources} for its field (after the statements of
    C{setup}, with C{names} as globals); a field whose expression is
    C{"None"} is never written, and costs nothing; one that is a string
    literal is written once, when the function is made.

    It runs once per request for each log, so its code is written out for
    C{fields} (no loop over names); the text of each run of strings that
    repeat from line to line (an address, a URL, a host, a role and a
    reason...) is made once and then found by the run's values (bounded
    memories, for values of the kinds' types); and the line is joined
    once.
    """
    if sources is None:
        if len(kinds) != len(fields):
            raise ValueError("one kind and one source per field")
        values = [f"v{index}" for index in range(len(fields))]
        return cast(
            Callable[..., str],
            _writer(
                [LineSpec(fields, kinds, values, stamp, now, system)],
                arguments=", ".join(values),
                names=names,
                single=True,
            ),
        )
    return cast(
        Callable[..., str],
        _writer(
            [LineSpec(fields, kinds, sources, stamp, now, system)],
            setup,
            arguments,
            names,
            single=True,
        ),
    )


@attr.s(auto_attribs=True, frozen=True)
class LineSpec:
    """
    One line a L{linesWriter} function writes: C{fields} of C{kinds}, each
    the value of its expression in C{sources}, and (with C{stamp}) the
    process log's time stamp and system, as L{lineWriter} takes them.
    """

    fields: tuple[str, ...]
    kinds: tuple[str, ...]
    sources: Sequence[str]
    stamp: Callable[[float], str] | None = None
    now: Callable[[], float] | None = None
    system: str = ""


def linesWriter(
    lines: Sequence[LineSpec],
    setup: Sequence[str] = (),
    arguments: str = "",
    names: Mapping[str, Any] | None = None,
) -> Callable[..., tuple[str, ...]]:
    """
    A function returning a tuple of C{lines}, each as the function
    L{lineWriter} makes for it would (with the same C{setup}, C{arguments}
    and C{names}): one call for lines made of the same record at once, in
    which an expression several lines share (a request id, an address) is
    read once, and a request id checked once.
    """
    return cast(
        Callable[..., tuple[str, ...]],
        _writer(lines, setup, arguments, names, single=False),
    )


def _writer(
    lines: Sequence[LineSpec],
    setup: Sequence[str] = (),
    arguments: str = "",
    names: Mapping[str, Any] | None = None,
    single: bool = False,
) -> Callable[..., Any]:
    """
    The code of L{lineWriter} and L{linesWriter}, compiled.
    """
    namespace: dict[str, Any] = {
        **(names or {}),
        "textValue": _textValue,
        "plainID": _PLAIN_ID,
        "decimal": _decimal,
        "copysign": math.copysign,
    }
    source = [f"def line({arguments}):"] + [f"    {line}" for line in setup]
    # Each expression is read once, into a variable (v<n>), however many
    # lines show it; a request id's check is made once (plain<n>).
    shared: dict[str, str] = {}
    plain: dict[str, str] = {}
    results = []
    for tag, spec in enumerate(lines):
        results.append(_lineCode(spec, f"_{tag}_", source, namespace, shared, plain))
    if single:
        source.append(f"    return {results[0]}")
    else:
        source.append(f"    return ({''.join(r + ', ' for r in results)})")
    exec("\n".join(source), namespace)
    return cast(Callable[..., Any], namespace["line"])


def _lineCode(
    spec: LineSpec,
    tag: str,
    source: list[str],
    namespace: dict[str, Any],
    shared: dict[str, str],
    plain: dict[str, str],
) -> str:
    """
    Add to C{source} the code making the line of C{spec} (its names in
    C{namespace} and its pieces' variables marked with C{tag}), and return
    the expression that is the line.
    """
    fields, kinds, sources = spec.fields, spec.kinds, spec.sources
    if len(kinds) != len(fields) or len(sources) != len(fields):
        raise ValueError("one kind and one source per field")
    for name in fields:
        if not name.isidentifier():
            raise ValueError(f"not a field name: {name!r}")
    values: dict[int, str] = {}
    used = [i for i in range(len(fields)) if sources[i] != "None"]
    for i in used:
        constant = _literal(sources[i])
        if constant is not None:
            # A constant string: its text is written once, here.
            kinds = (*kinds[:i], "constant", *kinds[i + 1 :])
            text = _piece(fields[i], "text", constant)
            if i == used[0] and spec.stamp is None:
                # Beginning a line without a time stamp: no space before.
                text = text[1:]
            source.append(f"    p{tag}{i} = {text!r}")
            continue
        expression = sources[i]
        if expression.isidentifier():
            # An argument (positional lines) or a name of the setup.
            values[i] = expression
            continue
        value = shared.get(expression)
        if value is None:
            value = shared[expression] = f"v{len(shared)}"
            source.append(f"    {value} = {expression}")
        values[i] = value
    pieces: list[str] = []
    at = 0
    while at < len(used):
        index = used[at]
        name, kind = fields[index], kinds[index]
        piece = f"p{tag}{index}"
        pieces.append(piece)
        if kind == "constant":
            at += 1
            continue
        if kind in _REMEMBERED:
            end = at
            while end < len(used) and kinds[used[end]] in _REMEMBERED:
                end += 1
            run = used[at:end]
            cache, fill = _run([fields[i] for i in run], [kinds[i] for i in run])
            namespace[f"cache{tag}{index}"] = cache
            namespace[f"fill{tag}{index}"] = fill
            key = "".join(f"{values[i]}, " for i in run)
            source += [
                f"    key = ({key})",
                f"    {piece} = cache{tag}{index}.get(key)",
                f"    if {piece} is None:",
                f"        {piece} = fill{tag}{index}(key)",
            ]
            at = end
            continue
        value = values[index]
        if kind == "id" and value not in plain:
            # One match for what needs no quotes, as request ids are made.
            plain[value] = f"plain_{value}"
            source.append(
                f"    plain_{value} = {value}.__class__ is str"
                f" and plainID({value}) is not None"
            )
        # The first field of a line without a time stamp is written
        # without the space before it (the line is then joined as it is).
        lead = "" if at == 0 and spec.stamp is None and kind == "id" else " "
        source += _fieldSource(
            name,
            kind,
            value,
            piece,
            f"{tag}{index}",
            namespace,
            plain.get(value),
            lead,
        )
        at += 1
    joined = "".join(f"{piece}, " for piece in pieces)
    first = kinds[used[0]] if used else None
    if spec.stamp is None:
        if first == "constant":
            # Never empty, and written without its space.
            return f"''.join(({joined}'\\n'))"
        if first == "id":
            rest = "".join(f"{piece}, " for piece in pieces[1:])
            return (
                f"(''.join(({joined}'\\n')) if {pieces[0]}"
                f" else ''.join(({rest}'\\n'))[1:] or '\\n')"
            )
        return f"''.join(({joined}'\\n'))[1:] or '\\n'"
    # The stamp and system of the second of the last line: from, until,
    # text.
    last: list[Any] = [0.0, 0.0, ""]
    namespace[f"now{tag}"] = spec.now
    namespace[f"newHead{tag}"] = _heads(spec.stamp, spec.system, last)
    namespace[f"last{tag}"] = last
    source += [
        f"    when = now{tag}()",
        f"    if last{tag}[0] <= when < last{tag}[1]:",
        f"        head{tag} = last{tag}[2]",
        "    else:",
        f"        head{tag} = newHead{tag}(when)",
    ]
    if first == "constant":
        # Never empty: joined with the head.
        return f"''.join((head{tag}, {joined}'\\n'))"
    source += [
        f"    text = ''.join(({joined}'\\n'))",
        f"    line{tag} = head{tag} + (text if text != '\\n' else ' \\n')",
    ]
    return f"line{tag}"


def _literal(expression: str) -> str | None:
    """
    The string C{expression} is, if it is a string literal.
    """
    try:
        value = ast.literal_eval(expression)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


def _fieldSource(
    name: str,
    kind: str,
    value: str,
    piece: str,
    suffix: str,
    namespace: dict[str, Any],
    plain: str | None = None,
    lead: str = " ",
) -> list[str]:
    """
    Lines of L{lineWriter}'s code setting C{piece} to the text of a field
    of C{kind} (not of L{_REMEMBERED}) whose value is C{value}; its names
    in C{namespace} end with C{suffix}.  For an C{"id"}, C{plain} is the
    variable saying whether the value needs no quotes, and C{lead} what
    its text begins with (the space before it, unless it begins the line).
    """
    prefix = repr(lead + name + "=")
    if kind not in ("id", "int", "count", "bool", "float", "round6", "ms"):
        raise ValueError(f"not a kind: {kind!r}")
    namespace[f"shown{suffix}"] = _shown(kind)
    if kind == "id":
        source = [
            f"    if {plain}:",
            f"        {piece} = {prefix} + {value}",
        ]
    elif kind in ("int", "count"):
        # Statuses, reason codes and sizes repeat: their texts are
        # remembered (ints only: True and 1.0 would find 1's).
        ints: dict[int, str] = {}
        namespace[f"ints{suffix}"] = ints
        namespace[f"fillInt{suffix}"] = _intFiller(name, ints)
        source = [
            f"    if {value}.__class__ is int:",
            f"        {piece} = ints{suffix}.get({value}) or fillInt{suffix}({value})",
        ]
    elif kind == "bool":
        source = [
            f"    if {value} is True:",
            f"        {piece} = {' ' + name + '=true'!r}",
            f"    elif {value} is False:",
            f"        {piece} = {' ' + name + '=false'!r}",
        ]
    elif kind == "float":
        source = [
            f"    if {value}.__class__ is float:",
            f"        {piece} = {prefix} + str({value})",
        ]
    elif kind == "round6":
        # _decimal, written out: a time of a request is unique to it.
        source = [
            f"    if {value}.__class__ is float:",
            f"        if 1e-4 <= {value} < 1e8:",
            f"            text = ('%.6f' % {value}).rstrip('0')",
            "            if text[-1] == '.':",
            "                text += '0'",
            f"            {piece} = {prefix} + text",
            "        else:",
            f"            {piece} = {prefix} + decimal({value}, 6)",
        ]
    else:
        # An exact zero (an IP literal's lookup time) is common.
        source = [
            f"    if {value}.__class__ is float:",
            f"        if {value} == 0.0 and copysign(1.0, {value}) > 0.0:",
            f"            {piece} = {' ' + name + '=0.0'!r}",
            "        else:",
            f"            {piece} = {prefix} + decimal({value} * 1000, 3)",
        ]
    return source + [
        f"    elif {value} is None:",
        f"        {piece} = ''",
        "    else:",
        f"        {piece} = {prefix} + textValue(shown{suffix}({value}))",
    ]


def recordFields(
    fields: tuple[str, ...],
    kinds: tuple[str, ...],
    sources: Sequence[str] | None = None,
    setup: Sequence[str] = (),
    arguments: str = "",
    names: Mapping[str, Any] | None = None,
) -> Callable[..., dict[str, Any]]:
    """
    A function taking what L{lineWriter}'s line takes (with the same
    C{sources}, C{setup}, C{arguments} and C{names}) and returning the
    values as the fields of L{LineLog.record} (the values the line shows).
    """
    shown = [_shown(kind) for kind in kinds]
    if sources is None:

        def asFields(*values: Any) -> dict[str, Any]:
            return {
                name: show(value)
                for name, show, value in zip(fields, shown, values, strict=True)
            }

        return asFields
    namespace: dict[str, Any] = {**(names or {})}
    source = [f"def asFields({arguments}):"] + [f"    {line}" for line in setup]
    source.append("    return {")
    for index, (name, expression) in enumerate(zip(fields, sources, strict=True)):
        namespace[f"shown{index}"] = shown[index]
        source.append(f"        {name!r}: shown{index}({expression}),")
    source.append("    }")
    exec("\n".join(source), namespace)
    return cast(Callable[..., dict[str, Any]], namespace["asFields"])


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

    def __init__(self, outFile: IO[Any], path: str | None = None) -> None:
        self.outFile = outFile
        self._path = path
        self._encode = ioType(outFile) is not str
        self._lines: list[str] = []
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

    def add(self, line: str) -> None:
        """
        Write C{line} (which ends with a newline), now or with its batch.
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
            text = "".join(lines)
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

    While the file is the only listener and the format is text, the
    proxy's lines are made at once by code written for the fields
    (L{lineWriter}, from L{proxy_app.accounting.LogObserver}) and wait in
    the file's L{LineBuffer} (L{fastSink}), written in batches; otherwise
    (JSON, or other observers: tests) the same values become the fields
    of L{record}, which takes them by name, as the line shows them.  The
    line is the same either way.

    @ivar publisher: the L{LogPublisher} lines are emitted to; tests add
        observers to it.
    @ivar enabled: whether anything takes this log's lines.
    @ivar fastSink: the buffer the proxy adds its finished lines to while
        the file is the only listener (else L{None}).
    @ivar stamping: the keyword arguments of L{lineWriter} that make this
        log's lines (for the process log: its time stamp and system).
    """

    fields: tuple[str, ...] = ACCESS_FIELDS
    kinds: tuple[str, ...] = ACCESS_KINDS
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
        self.fastSink: LineBuffer | None = None
        self.stamping: dict[str, Any] = {}
        if outFile is not None:
            self._attach(LineBuffer(outFile, path))

    def _attach(self, sink: LineBuffer) -> None:
        self._sink = sink
        if self._clock is not None:
            sink.batch(self._clock, self._interval)
        self._observer = _LineObserver(sink, self._formatter)
        self.publisher.addObserver(self._observer)
        self.enabled = True
        self._checkFast()

    def _checkFast(self) -> None:
        self.fastSink = self._sink if not self._json and not self._listeners else None

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
        self._checkFast()

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
        self._attach(LineBuffer(newFile, self._path))
        log.info("Reopened log {path}", path=self._path)

    def record(self, **fields: Any) -> None:
        """
        Write one line with the given fields, as the line shows them.
        """
        sink = self.fastSink
        if sink is not None:
            sink.add(self._text(fields))
        else:
            self._record(**fields)

    def _text(self, fields: Mapping[str, Any]) -> str:
        text: str = self._formatter(fields)
        return text

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
    kinds = DECISION_KINDS
    namespace = "egressproxy.decision"

    # The process log's file, when it is ours (L{toProcessLog}).
    _processLog: TextProcessLog | None = None

    def _checkFast(self) -> None:
        processLog = self._processLog
        if processLog is None:
            LineLog._checkFast(self)
        else:
            # The one listener that is not another observer (a test's)
            # is the process log's.
            self.fastSink = (
                processLog.buffer
                if processLog.installed and self._listeners == 1
                else None
            )

    @classmethod
    def toProcessLog(cls, processLog: TextProcessLog | None = None) -> DecisionLog:
        """
        Decision lines for the process log.

        @param processLog: the process log's observer, when the process
            log is ours (L{TextProcessLog}): once it is installed, lines
            are made once, as its text observer would have written them,
            with its time stamp, into its buffer; else (and while others
            listen) each line is an event of the global log publisher.
        """
        decisions = cls(None)
        text = textFormatter(DECISION_FIELDS)
        processLogger = Logger(namespace=cls.namespace)

        def forward(event: dict[str, Any]) -> None:
            fields = {k: event[k] for k in DECISION_FIELDS if k in event}
            processLogger.info("{line}", line=text(event).rstrip("\n"), **fields)

        # The only listener that is not another observer (a test's).
        decisions.addObserver(cast(ILogObserver, forward))
        if processLog is not None:
            decisions._processLog = processLog
            decisions.stamping = dict(
                stamp=processLog.formatTime,
                now=processLog.now,
                system=_DECISION_SYSTEM,
            )
            processLog.whenInstalled(decisions._checkFast)
            decisions._checkFast()
        return decisions

    def _text(self, fields: Mapping[str, Any]) -> str:
        processLog = self._processLog
        if processLog is None:
            return LineLog._text(self, fields)
        return (
            f"{processLog.formatTime(processLog.now())} [{_DECISION_SYSTEM}] "
            f"{self._formatter(fields)}"
        )

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
    lines go into L{buffer} without an event, made by code written for
    their fields (L{DecisionLog.toProcessLog}, L{lineWriter}), and are
    written in batches (L{LineBuffer}); L{addLine} adds a line formatted
    by the caller.  Every other event is written at once, after the lines
    that wait, so the order is kept.

    @ivar installed: whether twistd logs to this observer (given a file
        when made, or L{install}ed); until then, decision lines go to the
        global log.
    """

    def __init__(
        self, outFile: IO[Any] | None = None, now: Callable[[], float] = time.time
    ) -> None:
        self.buffer = LineBuffer(outFile if outFile is not None else sys.stdout)
        self.installed = outFile is not None
        self._whenInstalled: list[Callable[[], None]] = []
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
        for call in self._whenInstalled:
            call()

    def whenInstalled(self, call: Callable[[], None]) -> None:
        """
        Call C{call} when this observer is L{install}ed.
        """
        self._whenInstalled.append(call)

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
    @ivar counting: whether anything can read what requests and connections
        move (C{--metrics none} makes nothing read them): when not, the
        proxy does not count them (L{proxy_app.accounting.observers}).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        process: bool = True,
        multiprocess: bool = False,
        counting: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess
        self.counting = counting
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
