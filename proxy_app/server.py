"""
The proxy's client side, as the rest of the code imports it: the public
front of the modules that hold it, as C{twisted.web.client} fronts
C{_newclient}.

  - L{proxy_app.channel}: L{ProxyFactory}, and L{ProxyProtocol}, one
    client connection with its one documented lifecycle state, which
    reads requests and frames what is written back;
  - L{proxy_app.exchange}: what every exchange shares (the request, its
    id, timing, failure and end);
  - L{proxy_app.forward}: L{ForwardExchange}, a forwarded request;
  - L{proxy_app.tunnel}: L{ConnectExchange}, a CONNECT tunnel.

Exchanges see the connection only through
L{proxy_app.interfaces.IClientChannel}.  See C{docs/architecture.md} for
a request's walk through them.
"""

from proxy_app.channel import ProxyFactory, ProxyProtocol, errorResponse
from proxy_app.forward import IDEMPOTENT_METHODS, ForwardExchange
from proxy_app.tunnel import TUNNEL_BUFFER, ConnectExchange

__all__ = [
    "IDEMPOTENT_METHODS",
    "TUNNEL_BUFFER",
    "ConnectExchange",
    "ForwardExchange",
    "ProxyFactory",
    "ProxyProtocol",
    "errorResponse",
]
