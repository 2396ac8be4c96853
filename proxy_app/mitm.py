"""
TLS interception of CONNECT tunnels (Smokescreen's C{mitm_domains},
webhook-sentry's MITM issuer).

An intercepted tunnel is admitted as every CONNECT is (role, ACL, address
vetting, gate); then, instead of connecting upstream, the proxy answers
C{200 Connection established} and speaks TLS to the client itself, with a
leaf certificate for the CONNECT host issued on the fly by the configured
CA (L{IssuingCA}).  Inside, an L{InterceptedChannel} reads HTTP/1.1
requests and makes each a forwarded request to
C{https://<CONNECT authority><path>}: judged by the ACL and rate limited
for the role the CONNECT established, sent to the addresses the CONNECT
was vetted to and the gate approved (no second lookup, no second access
request), and originated (verified TLS) exactly as any C{https://}
request.  The tunnel is one control-webhook session, as in smithproxy:
its C{connection-stop} lists the URLs inside.

The nested TLS runs in memory
(L{twisted.protocols.tls.TLSMemoryBIOProtocol}) over the tunnel's bytes, so
it works the same on a plain and on a TLS listener.

The CA key is read once, kept in memory, and never logged nor put into an
exception message; leaf certificates and their key are never written
anywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections import OrderedDict
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.acl import MitmDomain, domainSet
from proxy_app.channel import ProxyProtocol, clientServerName
from proxy_app.forward import ForwardExchange
from proxy_app.http1 import RequestHead
from proxy_app.reasons import ProxyError, Reason
from proxy_app.target import Target, parseAbsoluteTarget

log = Logger()

# A leaf's notBefore lies this far in the past, for clients whose clock is
# a little behind ours.
BACKDATE = 300.0
# Every tunnel that mitm.domains or mitm.all selects uses this entry: no
# headers added, no detailed logs.
GLOBAL = MitmDomain("*")


def notValidAfter(certificate: x509.Certificate) -> float:
    """
    A certificate's notAfter, in seconds since the epoch: cryptography 42
    names it C{not_valid_after_utc}; 41 (the oldest pyOpenSSL 23.3 takes)
    has only the naive C{not_valid_after}, in UTC.
    """
    aware = getattr(certificate, "not_valid_after_utc", None)
    if aware is None:
        aware = certificate.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return float(aware.timestamp())


class MitmConfigError(ValueError):
    """
    The CA cannot be used; C{str()} names the key and the file, never
    the key's contents.
    """


def _readFile(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise MitmConfigError(
            f"{key} = {path!r}: cannot read it: {e.strerror or e}"
        ) from None


class IssuingCA:
    """
    The CA that issues the leaf certificates intercepted tunnels show, and
    the bounded cache of those leaves (one per host, least recently used
    dropped first).  Leaves have one ECDSA P-256 key, made once per
    process; each is valid for C{lifetime} seconds from the clock's now
    (backdated by L{BACKDATE}, and never beyond the CA's own notAfter),
    and is re-issued once a quarter of that is left.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        key: Any,
        clock: Any,
        lifetime: float = 86400.0,
        cacheSize: int = 1000,
    ) -> None:
        self._certificate = certificate
        self._key = key
        self._clock = clock
        self.lifetime = lifetime
        self.cacheSize = cacheSize
        self._leafKey = ec.generate_private_key(ec.SECP256R1())
        self._leafPKey = crypto.PKey.from_cryptography_key(self._leafKey)
        self._caX509 = crypto.X509.from_cryptography(certificate)
        # host -> (re-issue after, notAfter, TLS factory)
        self._cache: OrderedDict[str, tuple[float, float, TLSMemoryBIOFactory]] = (
            OrderedDict()
        )
        self.issued = 0

    def __repr__(self) -> str:
        # Never the key.
        return f"<IssuingCA {self._certificate.subject.rfc4514_string()}>"

    @classmethod
    def load(
        cls,
        certPath: str,
        keyPath: str,
        clock: Any,
        lifetime: float = 86400.0,
        cacheSize: int = 1000,
    ) -> IssuingCA:
        """
        Read and check the CA: a certificate with C{basicConstraints:
        CA:TRUE}, and its unencrypted private key.

        @raise MitmConfigError: one line naming the key and the path.
        """
        certPEM = _readFile("mitm.ca_cert", certPath)
        keyPEM = _readFile("mitm.ca_key", keyPath)
        try:
            certificate = x509.load_pem_x509_certificate(certPEM)
        except ValueError:
            raise MitmConfigError(
                f"mitm.ca_cert = {certPath!r}: not a PEM certificate"
            ) from None
        try:
            constraints = certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
            isCA = constraints.ca
        except x509.ExtensionNotFound:
            isCA = False
        if not isCA:
            raise MitmConfigError(
                f"mitm.ca_cert = {certPath!r}: not a CA certificate "
                "(basicConstraints CA:TRUE is missing)"
            )
        try:
            key = serialization.load_pem_private_key(keyPEM, password=None)
        except TypeError:
            raise MitmConfigError(
                f"mitm.ca_key = {keyPath!r}: the key is encrypted; give it "
                "unencrypted (and readable only by the proxy)"
            ) from None
        except (ValueError, crypto.Error):
            # The library's message could quote the file: say nothing of it.
            raise MitmConfigError(
                f"mitm.ca_key = {keyPath!r}: not a PEM private key"
            ) from None
        if not isinstance(
            key,
            (
                ec.EllipticCurvePrivateKey,
                rsa.RSAPrivateKey,
                ed25519.Ed25519PrivateKey,
                ed448.Ed448PrivateKey,
            ),
        ):
            raise MitmConfigError(
                f"mitm.ca_key = {keyPath!r}: unsupported key type; use EC, RSA "
                "or Ed25519"
            )
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, public) != (
            certificate.public_key().public_bytes(der, public)
        ):
            raise MitmConfigError(
                f"mitm.ca_key = {keyPath!r}: does not match the key of "
                f"mitm.ca_cert = {certPath!r}"
            )
        return cls(certificate, key, clock, lifetime, cacheSize)

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def _hash(self) -> Any:
        if isinstance(self._key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
            return None
        return hashes.SHA256()

    def issue(self, host: str) -> tuple[x509.Certificate, float]:
        """
        A new leaf certificate for C{host} (a DNS name or an IP literal,
        its only subjectAltName).

        @return: the certificate and its notAfter in clock seconds.
        """
        now = self._clock.seconds()
        start = now - BACKDATE
        caEnd = notValidAfter(self._certificate)
        end = min(now + self.lifetime, caEnd)
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        utc = datetime.timezone.utc
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
            )
            .issuer_name(self._certificate.subject)
            .public_key(self._leafKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(start, utc))
            .not_valid_after(datetime.datetime.fromtimestamp(end, utc))
            .add_extension(x509.SubjectAlternativeName([name]), critical=False)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()
                ),
                critical=False,
            )
        )
        self.issued += 1
        return builder.sign(self._key, self._hash()), end

    def tlsFactory(self, host: str) -> TLSMemoryBIOFactory:
        """
        The server side of TLS for a tunnel to C{host}: its leaf, the CA
        behind it, TLS 1.2 at least, and ALPN offering only C{http/1.1};
        from the cache while the leaf has more than a quarter of its life
        left.
        """
        now = self._clock.seconds()
        cache = self._cache
        entry = cache.get(host)
        if entry is not None and now < entry[0]:
            cache.move_to_end(host)
            return entry[2]
        certificate, end = self.issue(host)
        options = ssl.CertificateOptions(
            privateKey=self._leafPKey,
            certificate=crypto.X509.from_cryptography(certificate),
            extraCertChain=[self._caX509],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableProtocols=[b"http/1.1"],
        )
        factory = TLSMemoryBIOFactory(options, False, Factory(), clock=self._clock)
        renew = end - (end - now) / 4
        cache[host] = (renew, end, factory)
        cache.move_to_end(host)
        while len(cache) > self.cacheSize:
            cache.popitem(last=False)
        return factory

    def cached(self) -> list[str]:
        """
        The hosts with a leaf in the cache, least recently used first.
        """
        return list(self._cache)


class Interception:
    """
    Which tunnels are intercepted, and the CA that does it.

    @ivar authority: the L{IssuingCA}.
    """

    def __init__(
        self,
        authority: IssuingCA,
        domains: tuple[str, ...] = (),
        everything: bool = False,
    ) -> None:
        self.authority = authority
        self._domains = domainSet(domains)
        self._everything = everything

    def select(self, access: Any, role: str | None, host: str) -> MitmDomain | None:
        """
        The C{mitm_domains} entry (or L{GLOBAL}) under which C{role}'s
        tunnel to C{host} is intercepted, or L{None} to pass it through.
        The ACL's own entry comes first: it carries C{add_headers} and the
        detailed logs.
        """
        acl = access.acl
        if acl is not None:
            entry = acl.mitmFor(role, host, access.allowMissingRole)
            if entry is not None:
                return entry
        if self._everything or self._domains.matches(host):
            return GLOBAL
        return None

    def start(self, exchange: Any, mitm: MitmDomain) -> InterceptedSession:
        """
        Begin TLS with the client of C{exchange}, whose CONNECT was just
        answered 200.
        """
        return InterceptedSession(
            exchange, self.authority.tlsFactory(exchange.target.host), mitm
        )


@implementer(ITransport, IConsumer, IPushProducer)
class _TunnelTransport:
    """
    What the nested TLS layer writes its records to and reads its flow
    control from: the client's own connection, with the bytes counted on
    the tunnel's exchange.
    """

    def __init__(self, client: Any, exchange: Any) -> None:
        self._client = client
        self._exchange = exchange

    @property
    def disconnecting(self) -> bool:
        return bool(getattr(self._client, "disconnecting", False))

    def write(self, data: bytes) -> None:
        exchange = self._exchange
        exchange.bytesDown += len(data)
        if exchange.statistics is not None:
            exchange.statistics.right(data)
        self._client.write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._client.loseConnection()

    def abortConnection(self) -> None:
        self._client.abortConnection()

    def getPeer(self) -> Any:
        return self._client.getPeer()

    def getHost(self) -> Any:
        return self._client.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._client.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._client.unregisterProducer()

    def pauseProducing(self) -> None:
        self._client.pauseProducing()

    def resumeProducing(self) -> None:
        self._client.resumeProducing()

    def stopProducing(self) -> None:
        self._client.stopProducing()


class InterceptedSession:
    """
    The inside of one intercepted tunnel: the client connection's bytes go
    through a server-side L{twisted.protocols.tls.TLSMemoryBIOProtocol} to an
    L{InterceptedChannel}.  It is the client connection's C{tunnel} (it
    takes L{fromClient} and the half-closes).

    @ivar urls: the (redacted) URLs of the requests made inside, for the
        tunnel's C{connection-stop}.
    @ivar sni: the server name the client's ClientHello carried, or
        L{None}.
    @ivar destination: the L{VettedDestination} the CONNECT was admitted
        to, the only addresses the requests inside connect to.
    """

    def __init__(
        self, exchange: Any, tlsFactory: TLSMemoryBIOFactory, mitm: MitmDomain
    ) -> None:
        self.exchange = exchange
        self.mitm = mitm
        # What the CONNECT was admitted to (vetted, then narrowed by the
        # gate): its requests connect there and nowhere else, for the
        # tunnel's life (timeouts.lifetime), as smithproxy's one session.
        self.destination = exchange.destination
        self.urls: list[str] = []
        self.sni: str | None = None
        self.channel = InterceptedChannel(exchange.factory, self)
        self.tls = tlsFactory.protocol(tlsFactory, self.channel)
        self._lost = False
        self.tls.makeConnection(_TunnelTransport(exchange.protocol.transport, exchange))

    def fromClient(self, data: bytes) -> None:
        exchange = self.exchange
        exchange.bytesUp += len(data)
        if exchange.statistics is not None:
            exchange.statistics.left(data)
        self.tls.dataReceived(data)

    def clientReadClosed(self) -> None:
        # TLS has its own end (close_notify); a bare FIN ends the tunnel.
        self.exchange.protocol.transport.loseConnection()

    def clientWriteClosed(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None) -> None:
        """
        The client connection is gone: so is everything inside it.
        """
        if self._lost:
            return
        self._lost = True
        self.tls.connectionLost(reason or Failure(ConnectionError("tunnel closed")))

    def target(self, request: RequestHead) -> Target:
        """
        Where an inner request goes: C{https://} to the CONNECT authority,
        with the request's path.  A request that names another host (in
        its target or its C{Host}) is refused, so that one tunnel's
        admission never carries a request meant for another virtual host.

        @raise ProxyError: 400 (1002) for a mismatch, an asterisk-form, an
            authority-form or a second C{Host}; 400 (1015) for a CONNECT.
        """
        connect = self.exchange.target
        if request.method == b"CONNECT":
            raise ProxyError(
                Reason.BAD_REQUEST,
                "CONNECT inside an intercepted tunnel is not supported",
            )
        raw = request.target
        where = f"the intercepted tunnel's destination {connect.authority}"
        if raw.startswith(b"/"):
            path = raw.split(b"#", 1)[0]
        elif raw == b"*":
            raise ProxyError(
                Reason.BAD_TARGET, "An asterisk-form request target cannot be proxied"
            )
        else:
            named = parseAbsoluteTarget(raw)
            if named.scheme != "https" or (named.host, named.port) != (
                connect.host,
                connect.port,
            ):
                raise ProxyError(
                    Reason.BAD_TARGET,
                    f"The request target names {named.scheme}://{named.authority}, "
                    f"not {where}",
                )
            path = named.path
        hosts = [value for name, value in request.headers if name == b"host"]
        if len(hosts) > 1:
            raise ProxyError(Reason.BAD_TARGET, "More than one Host header")
        if hosts:
            try:
                named = parseAbsoluteTarget(b"https://" + hosts[0].strip() + b"/")
            except ProxyError:
                raise ProxyError(Reason.BAD_TARGET, "Invalid Host header") from None
            if (named.host, named.port) != (connect.host, connect.port) or (
                named.path != b"/"
            ):
                raise ProxyError(
                    Reason.BAD_TARGET,
                    f"Host {named.authority} does not match {where}",
                )
        elif request.version != "1.0":
            raise ProxyError(Reason.BAD_TARGET, "An HTTP/1.1 request needs a Host")
        return Target(connect.host, connect.port, "https", path, connect.port != 443)

    def addHeaders(self, request: RequestHead) -> None:
        """
        Set the C{add_headers} of the tunnel's C{mitm_domains} entry,
        replacing the request's headers of the same names.
        """
        added = self.mitm.addHeaders
        if not added:
            return
        names = {name.lower().encode("ascii") for name, _ in added}
        kept = [
            (header, raw)
            for header, raw in zip(request.headers, request.raw, strict=True)
            if header[0] not in names
        ]
        request.headers = [header for header, _ in kept]
        request.raw = [raw for _, raw in kept]
        for name, value in added:
            encoded = value.encode("latin-1")
            request.headers.append((name.lower().encode("ascii"), encoded))
            request.raw.append((name.encode("ascii"), encoded))

    def requested(self, exchange: ForwardExchange) -> None:
        """
        An inner request was made: list its URL, and with
        C{detailed_http_logs} log it as Smokescreen does.
        """
        if len(self.urls) < 100:
            self.urls.append(exchange.url)
        mitm = self.mitm
        if mitm.detailedLogs:
            full = mitm.fullHeaders
            headers: dict[str, list[str]] = {}
            for name, value in exchange.request.raw:
                text = name.decode("latin-1")
                shown = (
                    value.decode("latin-1") if text.lower() in full else "[REDACTED]"
                )
                headers.setdefault(text, []).append(shown)
            log.info(
                "{rq_id} intercepted {mitm_req_method} {mitm_req_url}",
                rq_id=exchange.requestID,
                mitm_req_method=exchange.request.method.decode("ascii", "replace"),
                mitm_req_url=exchange.url,
                mitm_req_headers=headers,
            )


class InterceptedChannel(ProxyProtocol):
    """
    The HTTP/1.1 connection inside an intercepted tunnel: each request is
    forwarded to C{https://<CONNECT authority><path>} as the CONNECT's
    role, to the addresses the CONNECT was admitted to.  It is not a
    client connection of its own (no connection metrics, no C{neighbor}
    event, no webhook events or access request of its requests: the
    tunnel is the session), and its role is fixed.
    """

    intercepted = True

    def __init__(self, factory: Any, session: InterceptedSession) -> None:
        super().__init__(factory)
        self.session = session
        outer = session.exchange.protocol
        self.listener = outer.listener
        self.role = session.exchange.role
        self.certificateCN = outer.certificateCN
        self.certificateOU = outer.certificateOU

    @property
    def tunnelDestination(self) -> Any:
        return self.session.destination

    def handshakeCompleted(self) -> None:
        self.overTLS = True
        self.session.sni = clientServerName(self.transport)

    def makeExchange(self, request: RequestHead) -> Any:
        session = self.session
        try:
            target = session.target(request)
        except ProxyError:
            if request.target.startswith(b"/"):
                # Logged as the tunnel's URL, as an admitted request is.
                authority = session.exchange.target.hostHeader
                request.target = b"https://" + authority + request.target
            raise
        # The URL as a proxy client would have sent it, for every log line.
        request.target = b"https://" + target.hostHeader + target.path
        session.addHeaders(request)
        exchange = ForwardExchange(self, self.factory, request, target)
        session.requested(exchange)
        return exchange


__all__ = [
    "GLOBAL",
    "InterceptedChannel",
    "InterceptedSession",
    "Interception",
    "IssuingCA",
    "MitmConfigError",
]
