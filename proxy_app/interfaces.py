"""
Interfaces between the proxy's parts.
"""

from zope.interface import Interface


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
