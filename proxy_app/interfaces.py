"""
Interfaces between the proxy's parts.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IDestinationResolver(Interface):
    """
    Turns a requested host and port into addresses the destination policy
    has approved.  It is the only way the proxy learns where to connect.
    """

    def vet(host: str, port: int) -> Any:
        """
        Resolve C{host} once and classify every answer.

        @param host: a normalized host name or canonical IP literal, as
            L{proxy_app.target.parseAbsoluteTarget} and
            L{proxy_app.target.parseConnectTarget} produce.
        @type host: L{str}
        @param port: the destination port.
        @type port: L{int}

        @return: a L{twisted.internet.defer.Deferred} firing with a
            L{proxy_app.resolver.VettedDestination} holding at least one
            allowed address, or failing with
            L{proxy_app.resolver.DestinationDenied} (every answer was
            denied; its subclass L{proxy_app.resolver.PortDenied} when the
            port rules refused the port, before any lookup) or
            L{proxy_app.resolver.ResolutionFailed} (no answer, lookup error
            or timeout).  Cancelling it abandons the lookup.
        """

    def vetNow(host: str, port: int) -> Any:
        """
        The answer to L{vet} when it needs no waiting: for an IP literal, or
        a name whose vetted answer is cached.

        @return: the L{proxy_app.resolver.VettedDestination}, or L{None} when
            only L{vet} can answer.
        @raise proxy_app.resolver.DestinationDenied: the literal is denied,
            or (L{proxy_app.resolver.PortDenied}) the port rules refuse the
            port, whether C{host} is a literal or a name.
        """


class IExplainedHostResolution(Interface):
    """
    What an L{twisted.internet.interfaces.IHostResolution} provides beside
    it when it can say why it found no addresses.

    L{twisted.internet.interfaces.IResolutionReceiver} has no way to report
    an error: a failed lookup simply completes with no addresses.  A
    resolver that knows what went wrong (NXDOMAIN, SERVFAIL, a timeout)
    provides this on the resolution it hands to C{resolutionBegan}, so that
    L{proxy_app.resolver.SafeResolver.vet} can name the error instead of
    saying only that there were no addresses.
    """

    error = Attribute(
        """
        L{None}, or the exception explaining why the resolution delivered no
        addresses.  Only meaningful once C{resolutionComplete} was called.
        """
    )


class IResponseSink(Interface):
    """
    Where an L{proxy_app.upstream.UpstreamHTTP} reports the response to the
    request it carries.  Exactly one of L{upstreamDone} and
    L{upstreamFailed} ends each request.
    """

    def upstreamInformational(event: Any) -> None:
        """
        A 1xx response (a L{proxy_app.http1.ResponseHead}) arrived.
        """

    def upstreamResponse(event: Any) -> None:
        """
        The response head (a L{proxy_app.http1.ResponseHead}) arrived.
        """

    def upstreamData(data: bytes) -> None:
        """
        A piece of the response body arrived.
        """

    def upstreamReadDone() -> None:
        """
        Everything parsed from one read of the connection has been reported,
        and the response is not complete yet.
        """

    def upstreamDone() -> None:
        """
        The response is complete.
        """

    def upstreamFailed(error: Any) -> None:
        """
        The request failed with C{error}, a L{proxy_app.reasons.ProxyError};
        if the response head was already reported, the response was cut.
        """


class IClientChannel(Interface):
    """
    The client connection as an exchange sees it: everything a forwarded
    request or a tunnel may do to the connection it came on.  The
    connection owns the framing; an exchange only says what to send.
    """

    clientAddress = Attribute("The client's C{host:port}, for logs.")
    peerHost = Attribute("The client's address, as a L{str}.")
    peerPort = Attribute("The client's port, as an L{int}.")
    overTLS = Attribute("Whether the client connected over TLS.")
    serverName = Attribute(
        "The server name (SNI) the client sent to a TLS listener, read when "
        "the control webhook is configured; else L{None}."
    )
    role = Attribute(
        "The role from a verified TLS client certificate's CN, or L{None}."
    )
    certificateCN = Attribute("The verified client certificate's CN, or L{None}.")
    certificateOU = Attribute("The verified client certificate's OU, or L{None}.")
    transport = Attribute(
        "The client's transport (a producer and consumer), for flow control "
        "and a tunnel's bytes; L{None} before the connection is made."
    )
    requestReadWhole = Attribute(
        "Whether the current request's end had been read when its exchange "
        "started: nothing of its body is left to hold back."
    )
    tunnel = Attribute(
        "The exchange this connection has become a tunnel for, or L{None}."
    )
    intercepted = Attribute(
        "Whether this is the inside of an intercepted tunnel, whose role "
        "(L{role}) is the CONNECT's and is not identified again."
    )
    tunnelDestination = Attribute(
        "Inside an intercepted tunnel, the L{VettedDestination} its CONNECT "
        "was admitted to (vetted, and narrowed by the access-request gate): "
        "the only addresses its requests may connect to; else L{None}."
    )

    def sendInformational(
        status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Send a 1xx response ahead of the final one (nothing if a response
        is already under way or the client has gone).
        """

    def sendHead(
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        bodiless: bool = False,
    ) -> bool:
        """
        Send a response head, adding the framing headers for the body that
        follows: C{length} bytes, or (for L{None}) as many as come before
        L{sendEnd}.

        @return: C{False} if the client has gone or a response was already
            under way (the connection is then aborted).
        """

    def sendBody(data: bytes) -> None:
        """
        Send part of the body of the response L{sendHead} began; with no
        such response in progress the connection is aborted instead.
        """

    def sendEnd() -> None:
        """
        The response L{sendHead} began is complete.
        """

    def sendError(
        error: Any, close: bool = False, requestID: str | None = None
    ) -> bool:
        """
        Answer with the proxy's own response for C{error}, a
        L{proxy_app.reasons.ProxyError}; close after it if C{close}.

        @return: C{False} if it could not be sent.
        """

    def sendTunnelEstablished() -> bool:
        """
        Answer a CONNECT with C{200 Connection established}.

        @return: C{False} if the client has gone or a response is under way.
        """

    def abort() -> None:
        """
        Cut the client connection, so that it cannot take a partial
        response for a whole one.
        """

    def exchangeDone() -> None:
        """
        The current exchange has ended (its access-log line written): read
        the next request, or close.
        """

    def resumeRequest() -> None:
        """
        The exchange is set up: the request's body may be read and handed
        to it now.
        """

    def becomeTunnel(exchange: Any) -> bytes:
        """
        The CONNECT succeeded: from now on every byte from the client goes
        to C{exchange}.

        @return: the bytes the client sent after the CONNECT head.
        """

    def resumeReading() -> None:
        """
        Read the client again after the pause taken while the exchange was
        set up: a tunnel calls it once both transports are wired together.
        """

    def takeCounts() -> tuple[int, int]:
        """
        The bytes read from the client as HTTP (heads and bodies as
        received, a CONNECT head without what followed it) and written to
        it (heads, bodies as framed) since the last call; the counts then
        start again from zero.  A tunnel's relayed bytes are not in them.
        """


class IExchangeObserver(Interface):
    """
    A sink for what happened to exchanges: the access log, the decision
    log, the metrics and the control webhook's events each implement it
    (L{proxy_app.accounting}).  An exchange hands its record (the
    exchange itself, read-only to observers but for the webhook's own
    fields) to every observer in turn; observers decide nothing.
    """

    def exchangeConnected(record: Any, host: str, reused: bool) -> None:
        """
        The upstream connection for C{record} is made (or was taken from
        the pool, if C{reused}), to the address C{host}.  If
        C{record.finished}, the client had gone meanwhile.
        """

    def tunnelEstablished(record: Any) -> None:
        """
        C{record}'s CONNECT was answered 200: the tunnel carries bytes from
        now on.
        """

    def exchangeEnded(record: Any) -> None:
        """
        C{record} is complete: answered, refused, failed or cut.
        """

    def tunnelClosed(record: Any) -> None:
        """
        C{record}'s established tunnel closed, after L{exchangeEnded}.
        """
