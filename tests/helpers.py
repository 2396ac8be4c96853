"""
Fakes and builders shared by the proxy's in-memory tests.
"""

from __future__ import annotations

from typing import Any

import attr
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import authority, common, dns, server
from zope.interface import implementer

from proxy_app.config import Config
from proxy_app.interfaces import IDestinationResolver
from proxy_app.observe import AccessLog
from proxy_app.resolver import VettedDestination
from proxy_app.server import ProxyFactory, ProxyProtocol
from proxy_app.upstream import Connector


@implementer(IDestinationResolver)
class FakeDestinationResolver:
    """
    Vets destinations from a table: C{answers[host]} is a list of addresses,
    an exception to fail with, or missing (the lookup never finishes).
    """

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.answers = dict(answers or {})
        self.calls: list[tuple[str, int]] = []
        self.pending: list[Deferred] = []
        self.cancelled: list[tuple[str, int]] = []
        # Whether vetNow answers (else every answer goes through vet's
        # Deferred, as a lookup would).
        self.immediate = True

    def vetNow(self, host: str, port: int) -> VettedDestination | None:
        """
        Answers from the table at once, as the real resolver does for
        literals and cached names; a missing answer needs L{vet}.
        """
        answer = self.answers.get(host)
        if answer is None or isinstance(answer, Exception) or not self.immediate:
            return None
        self.calls.append((host, port))
        return VettedDestination(host, port, tuple(answer))

    def vet(self, host: str, port: int) -> Deferred:
        self.calls.append((host, port))
        answer = self.answers.get(host)
        if isinstance(answer, Exception):
            return fail(answer)
        if answer is None:
            d: Deferred = Deferred(lambda d: self.cancelled.append((host, port)))
            self.pending.append(d)
            return d
        return succeed(VettedDestination(host, port, tuple(answer)))


class HalfCloseStringTransport(StringTransport):
    """
    A L{StringTransport} that records half-closes.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


@implementer(IHostResolution)
class FinishedResolution:
    """
    The resolution a name resolver that answers at once hands out: by the
    time anyone holds it, there is nothing left to cancel.

    @ivar name: the host name that was resolved.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """
        Refuse, as Twisted's own resolutions of C{getaddrinfo} do.
        """
        raise NotImplementedError("the resolution has already finished")


@implementer(IHostnameResolver)
class ScriptedNameResolver:
    """
    Answers each lookup of a name with the next answer in its script, so a
    test can play a rebinding DNS server.
    """

    def __init__(self, scripts: dict[str, list[list[str]]]) -> None:
        self.scripts = scripts
        self.lookups: list[str] = []

    def resolveHostName(
        self,
        receiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        self.lookups.append(hostName)
        resolution = FinishedResolution(hostName)
        receiver.resolutionBegan(resolution)
        script = self.scripts.get(hostName) or []
        # The last answer repeats once the script is used up.
        answers = script.pop(0) if len(script) > 1 else (script[0] if script else [])
        for address in answers:
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()
        return resolution


@attr.s(auto_attribs=True)
class Harness:
    """
    A proxy factory on a memory reactor, with one client connected.
    """

    reactor: MemoryReactorClock
    resolver: FakeDestinationResolver
    factory: ProxyFactory
    protocol: ProxyProtocol
    client: HalfCloseStringTransport
    access: list[dict[str, Any]]

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def connectUpstream(self, index: int = -1) -> tuple[Any, HalfCloseStringTransport]:
        """
        Complete the C{index}th outbound connection attempt.

        @return: the protocol the reactor would drive (ours, which the
            connector connects without an endpoint's wrapper) and its
            transport.
        """
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseStringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return protocol, transport

    def failUpstream(self, reason: Exception, index: int = -1) -> None:
        connector = self.reactor.connectors[index]
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(connector, _failure(reason))


def _failure(reason: Exception) -> Any:
    from twisted.python.failure import Failure

    return Failure(reason)


def makeHarness(
    answers: dict[str, Any] | None = None, config: Config | None = None
) -> Harness:
    reactor = MemoryReactorClock()
    resolver = FakeDestinationResolver(
        {"origin.example": ["203.0.113.10"]} if answers is None else answers
    )
    config = config or Config()
    accessLog = AccessLog(None)
    access: list[dict[str, Any]] = []
    accessLog.addObserver(access.append)
    factory = ProxyFactory(
        config,
        resolver,
        reactor,
        Connector(reactor, config.timeouts.connect),
        accessLog,
    )
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    client = HalfCloseStringTransport(
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
    )
    protocol.makeConnection(client)
    return Harness(reactor, resolver, factory, protocol, client, access)


def parseResponse(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    Split one response into status, lower-cased headers and the rest.
    """
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


class InMemoryAuthority(authority.FileAuthority):
    """
    An authority for one zone, from records given in memory.
    """

    def __init__(self, soa: Any, records: dict[bytes, list[Any]]) -> None:
        common.ResolverBase.__init__(self)
        self.soa = soa
        self.records = records
        self._cache = {}


def startNameServer(reactor: Any, zone: bytes, records: dict[bytes, list[Any]]) -> Any:
    """
    Serve C{records} for C{zone} with twisted.names on 127.0.0.1, UDP, an
    ephemeral port.

    @return: the listening port; C{getHost().port} is its number.
    """
    soa = dns.Record_SOA(
        mname=b"ns." + zone,
        rname=b"hostmaster." + zone,
        serial=1,
        refresh=60,
        retry=60,
        expire=60,
        minimum=60,
    )
    records = {zone: [soa], **records}
    factory = server.DNSServerFactory(
        authorities=[InMemoryAuthority((zone, soa), records)]
    )
    return reactor.listenUDP(
        0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1"
    )


@implementer(IHostnameResolver)
class _NoSystemResolver:
    """
    The name resolver of a L{PluggableMemoryReactor}: tests in memory never
    resolve through the system.
    """

    def resolveHostName(  # type: ignore[no-untyped-def]
        self,
        resolutionReceiver,
        hostName,
        portNumber=0,
        addressTypes=None,
        transportSemantics="TCP",
    ):
        raise AssertionError(
            f"{hostName!r} resolved through a memory reactor's system resolver"
        )


@implementer(IReactorPluggableNameResolver)
class PluggableMemoryReactor(MemoryReactorClock):
    """
    A C{MemoryReactorClock} with a name resolver, as
    C{makeNameResolver} and C{makeService} expect of a reactor.  Twisted's
    own is one only from 25.5 on, and the tests run on the lowest Twisted
    C{setup.cfg} allows too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nameResolver: Any = _NoSystemResolver()

    def installNameResolver(self, resolver: Any) -> Any:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous
