"""
What of a request target may be written down: the form of it that the
access log, the decision log, the process log and the control webhook's
C{connection-stop} events show.

Only that copy is changed; the request the origin receives keeps its query
as the client sent it.  Two things are taken out:

  - userinfo (C{user:password@} before the host) always: the proxy refuses
    such targets (see L{proxy_app.target}), and the refusal must not write
    down the password it refused;
  - query values and the fragment, unless the operator asks to keep them
    (C{access_log.log_query_values}): they carry API keys, signed-URL
    signatures and session tokens.  Parameter names stay, so that a line
    still says which call was made: C{?token=…&page=…}.
"""

from __future__ import annotations

#: What stands for a removed value.
REDACTED = "\u2026"

#: The longest redacted query written; a longer one is cut at a parameter
#: boundary and ends in C{&…}.  (The request line's own limit bounds the
#: work; this bounds the line an attacker can make the proxy write.)
MAX_LOGGED_QUERY = 1024


def redactQuery(query: str) -> str:
    """
    C{query} (what follows the C{?}, without a fragment) with every value
    replaced by C{…} and the parameter names kept.

    Parameters are separated by C{&}.  The name is what precedes a
    parameter's first C{=}; an empty value stays empty (C{a=}).  Two forms
    might hide a secret in what looks like a name, so they are replaced as
    well:
      - a parameter without C{=} (C{?s3cr3t}): some services take a bare
        token as the whole query;
      - a name holding C{;}, which some servers read as a separator too:
        what precedes the last C{;} would be a bare parameter to them
        (C{a;b=1} is written C{…;b=…}).
    A value holding C{;} or C{=} is replaced whole, so no reading of the
    query shows a piece of a value as a name.  Percent-encoding is not
    decoded: names are written as sent, values never.

    @return: the redacted query, at most about L{MAX_LOGGED_QUERY}
        characters.
    """
    parts = []
    size = 0
    for part in query.split("&"):
        if part:
            name, equals, value = part.partition("=")
            if not equals:
                part = REDACTED
            else:
                if ";" in name:
                    name = (REDACTED + ";") * name.count(";") + name.rpartition(";")[2]
                part = f"{name}={REDACTED}" if value else f"{name}="
        size += len(part) + 1
        if size > MAX_LOGGED_QUERY + 1:
            parts.append(REDACTED)
            break
        parts.append(part)
    return "&".join(parts)


def loggedTarget(raw: bytes, keepQuery: bool = False) -> str:
    """
    The request target C{raw} as logs and webhook events show it: without
    userinfo, and (unless C{keepQuery}) with its query values redacted by
    L{redactQuery} and its fragment replaced by C{…}.

    The authority is what follows the first C{//} up to the next C{/},
    once the query and fragment are split off (RFC 3986 section 3.2: the
    same authority L{proxy_app.target} reads); without a C{//}, a target
    not starting with C{/} (a CONNECT target) is all authority.  Whatever
    precedes the authority's last C{@} is userinfo, and is written C{…}.

    A target with nothing to take out (no C{@}, C{?} or C{#}) costs three
    byte scans and the decoding.
    """
    if b"@" not in raw and (keepQuery or (b"?" not in raw and b"#" not in raw)):
        return raw.decode("utf-8", "replace")
    text = raw.decode("utf-8", "replace")
    rest, hashSign, fragment = text.partition("#")
    rest, questionMark, query = rest.partition("?")
    if "@" in rest:
        slashes = rest.find("//")
        if slashes >= 0:
            start = slashes + 2
            end = rest.find("/", start)
            if end < 0:
                end = len(rest)
        elif rest.startswith("/"):
            # Origin-form: a path, no authority.
            start = end = 0
        else:
            # Authority-form (CONNECT), or not a URI at all: all of it.
            start, end = 0, len(rest)
        at = rest.rfind("@", start, end)
        if at >= 0:
            rest = rest[:start] + REDACTED + rest[at:]
    if keepQuery:
        return rest + questionMark + query + hashSign + fragment
    if query:
        query = redactQuery(query)
    if fragment:
        fragment = REDACTED
    return rest + questionMark + query + hashSign + fragment
