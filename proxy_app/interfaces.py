"""
Interfaces between the proxy's parts.
"""

from twisted.internet.interfaces import IHostResolution
from zope.interface import Attribute, Interface


class IDestinationResolver(Interface):
    """
    Turns a requested host and port into addresses the destination policy
    has approved.  It is the only way the proxy learns where to connect.
    """

    def vet(host, port):
        """
        Resolve C{host} once and classify every answer.

        @param host: a normalized host name or canonical IP literal, as
            L{proxy_app.target.parseTarget} produces.
        @type host: L{str}
        @param port: the destination port.
        @type port: L{int}

        @return: a L{Deferred} firing with a
            L{proxy_app.resolver.VettedDestination} holding at least one
            allowed address, or failing with
            L{proxy_app.resolver.DestinationDenied} (every answer was
            denied) or L{proxy_app.resolver.ResolutionFailed} (no answer,
            lookup error or timeout).  Cancelling it abandons the lookup.
        """


    def vetNow(host, port):
        """
        The answer to L{vet} when it needs no waiting: for an IP literal, or
        a name whose vetted answer is cached.

        @return: the L{proxy_app.resolver.VettedDestination}, or L{None} when
            only L{vet} can answer.
        @raise proxy_app.resolver.DestinationDenied: the literal is denied.
        """


class IExplainedHostResolution(IHostResolution):
    """
    An L{IHostResolution} that can say why it found no addresses.

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

    def upstreamInformational(event):
        """
        A 1xx response (a L{proxy_app.http1.ResponseHead}) arrived.
        """

    def upstreamResponse(event):
        """
        The response head (a L{proxy_app.http1.ResponseHead}) arrived.
        """

    def upstreamData(data):
        """
        A piece of the response body arrived.
        """

    def upstreamReadDone():
        """
        Everything parsed from one read of the connection has been reported,
        and the response is not complete yet.
        """

    def upstreamDone():
        """
        The response is complete.
        """

    def upstreamFailed(error):
        """
        The request failed with C{error}, a L{proxy_app.reasons.ProxyError};
        if the response head was already reported, the response was cut.
        """
