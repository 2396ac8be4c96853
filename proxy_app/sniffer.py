"""
The first bytes a client sends through a tunnel: whether they begin a TLS
handshake and, if so, which server name (SNI) its ClientHello asks for.

Only tunnels use it, to fill C{connection-stop}'s C{tls} and C{l7} (see
L{proxy_app.webhook.connectionStopInfo}).  Pure: it parses bytes and does
no I/O.
"""

from __future__ import annotations


class TLSSniffer:
    """
    Tells from the first bytes a client sends through a tunnel whether they
    begin a TLS handshake and, if so, which server name (SNI) the
    ClientHello asks for: what C{connection-stop}'s C{tls} and C{l7} report
    for a tunnel.

    Feed it every chunk from the client; it keeps at most C{limit} bytes
    and stops looking once it knows (L{done}).

    @ivar done: whether it has decided.
    @ivar isTLS: whether the bytes begin a TLS handshake record.
    @ivar sni: the ClientHello's server name, or L{None}.
    """

    def __init__(self, limit: int = 16384 + 5) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self.done = False
        self.isTLS = False
        self.sni: str | None = None

    def feed(self, data: bytes) -> None:
        """
        Look at the next chunk the client sent; once L{done}, chunks are
        ignored.
        """
        if self.done or not data:
            return
        self._buffer += data[: self._limit - len(self._buffer)]
        result = _parseClientHello(bytes(self._buffer))
        if result is None:
            if len(self._buffer) < self._limit:
                return
            # A ClientHello this long is not one we will ever see whole.
            result = (self._buffer[:1] == b"\x16", None)
        self.isTLS, self.sni = result
        self.done = True
        self._buffer = bytearray()


def _parseClientHello(data: bytes) -> tuple[bool, str | None] | None:
    """
    Parse the handshake records at the start of C{data}.

    @return: C{(False, None)} if they are not TLS, C{(True, sni)} once the
        ClientHello is complete (C{sni} L{None} if it names no host), or
        L{None} if more bytes are needed.
    """
    # Reassemble the handshake message from consecutive handshake records;
    # a big ClientHello (post-quantum key shares) may span two.
    handshake = bytearray()
    offset = 0
    while True:
        if len(data) < offset + 5:
            if offset == 0 and data and data[0] != 0x16:
                return (False, None)
            return None
        kind, major, length = (
            data[offset],
            data[offset + 1],
            int.from_bytes(data[offset + 3 : offset + 5], "big"),
        )
        if kind != 0x16 or major != 3 or length == 0:
            return (False, None) if offset == 0 else (True, None)
        fragment = data[offset + 5 : offset + 5 + length]
        handshake += fragment
        if len(handshake) >= 4:
            if handshake[0] != 1:
                return (True, None)
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= needed:
                return (True, _sniFromClientHello(bytes(handshake[4:needed])))
        if len(fragment) < length:
            return None
        offset += 5 + length


def _sniFromClientHello(body: bytes) -> str | None:
    """
    The host name of a ClientHello body's C{server_name} extension, or
    L{None} if it has none or the body is malformed.
    """
    try:
        position = 2 + 32  # client_version, random
        position += 1 + body[position]  # session_id
        position += 2 + int.from_bytes(
            body[position : position + 2], "big"
        )  # cipher_suites
        position += 1 + body[position]  # compression_methods
        end = position + 2 + int.from_bytes(body[position : position + 2], "big")
        position += 2
        while position + 4 <= min(end, len(body)):
            extension = int.from_bytes(body[position : position + 2], "big")
            size = int.from_bytes(body[position + 2 : position + 4], "big")
            position += 4
            if extension == 0:  # server_name
                names = body[position : position + size]
                cursor = 2
                while cursor + 3 <= len(names):
                    nameType = names[cursor]
                    nameLength = int.from_bytes(names[cursor + 1 : cursor + 3], "big")
                    name = names[cursor + 3 : cursor + 3 + nameLength]
                    if nameType == 0 and len(name) == nameLength:
                        return name.decode("ascii").lower() or None
                    cursor += 3 + nameLength
                return None
            position += size
    except (IndexError, UnicodeDecodeError):
        return None
    return None


__all__ = ["TLSSniffer"]
