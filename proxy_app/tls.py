"""
TLS for the proxy: the trust root and client identities for originating
TLS to destinations, and the translation of TLS failures into reason codes.

Origination follows webhook-sentry: the client sends plain C{http://} with
C{X-WhSentry-TLS: true} (or an absolute C{https://} URI) and the proxy
speaks TLS to the vetted address, verifying the certificate against
certifi's Mozilla bundle (every certificate in it) and the host name with
service-identity, sending the host name as SNI, TLS 1.2 at least.

The verification is ours (L{ClientConnectionCreator}), on pyOpenSSL and
service-identity and Twisted's public API only, so that a refused
certificate reads the same (C{certificate has expired}, C{hostname
mismatch: wanted X, certificate is for Y}) on every Twisted we support.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attr
import certifi
import idna
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.hazmat import (
    DNS_ID,
    IPAddress_ID,
    ServiceID,
    verify_service_identity,
)
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.reasons import ProxyError, Reason

log = Logger()

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s.+?\s-----END CERTIFICATE-----", re.DOTALL
)


class TLSConfigError(ValueError):
    """
    A certificate, key or CA file that cannot be used; the message names it.
    """


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{path!r}: cannot read it: {e.strerror}") from None


def loadCertificates(path: str) -> list[ssl.Certificate]:
    """
    Every certificate in a PEM file (a bundle holds many;
    L{ssl.Certificate.loadPEM} alone reads only the first).

    @raise TLSConfigError: if the file cannot be read or holds none.
    """
    blocks = _PEM_CERT.findall(_read(path))
    if not blocks:
        raise TLSConfigError(f"{path!r}: holds no PEM certificate")
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except crypto.Error as e:
        raise TLSConfigError(f"{path!r}: invalid certificate: {e}") from None


def loadTrustRoot(caBundle: str | None = None, extra: Sequence[str] = ()) -> Any:
    """
    The trust root for verifying destinations: C{caBundle} (certifi's
    Mozilla bundle by default) plus any C{extra} CA files.
    """
    certificates = loadCertificates(caBundle or certifi.where())
    for path in extra:
        certificates.extend(loadCertificates(path))
    return ssl.trustRootFromCertificates(certificates)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClientIdentity:
    """
    A client certificate presented to destinations that ask for one.

    @ivar alias: its name (C{"default"} for C{--client-cert}).
    @ivar certificate: the certificate with its private key.
    @ivar roles: the roles that may present it, or L{None} for no binding
        (see L{Origination.permit}).
    """

    alias: str
    certificate: ssl.PrivateCertificate = attr.ib(eq=False, repr=False)
    roles: frozenset[str] | None = None


def loadClientIdentity(
    alias: str, certPath: str, keyPath: str, roles: Iterable[str] | None = None
) -> ClientIdentity:
    """
    Load a client certificate and its key, and check that they belong
    together.

    @param roles: the roles bound to it, or L{None} for none.

    @raise TLSConfigError: naming the file and the problem.
    """
    certPEM = _read(certPath)
    keyPEM = _read(keyPath)
    try:
        x509 = crypto.load_certificate(crypto.FILETYPE_PEM, certPEM)
    except crypto.Error:
        raise TLSConfigError(f"{certPath!r}: not a PEM certificate") from None
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, keyPEM)
    except crypto.Error:
        raise TLSConfigError(
            f"{keyPath!r}: not a PEM private key (or it is encrypted)"
        ) from None
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate(x509)
    try:
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(
            f"{keyPath!r} is not the private key of the certificate in {certPath!r}"
        ) from None
    certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
        ssl.Certificate(x509), ssl.KeyPair(key)
    )
    return ClientIdentity(
        alias, certificate, None if roles is None else frozenset(roles)
    )


DEFAULT_ALIAS = "default"


class Origination:
    """
    Everything needed to originate TLS: the trust root and the client
    identities.  Connection creators are cached per (host, identity), since
    building one costs more than a handshake's worth of Python.

    @ivar rolesInUse: whether clients of this deployment can have roles
        (proxy authentication, a trusted role header, a TLS listener asking
        for client certificates, or an ACL).  Then an alias is presented
        only to the roles bound to it; without roles, to every client, as
        webhook-sentry does.
    """

    def __init__(
        self,
        trustRoot: Any,
        default: ClientIdentity | None = None,
        aliases: Mapping[str, ClientIdentity] | None = None,
        rolesInUse: bool = False,
    ) -> None:
        self.trustRoot = trustRoot
        self.default = default
        self.aliases = dict(aliases or {})
        if DEFAULT_ALIAS in self.aliases:
            # Two certificates behind one name would share a connection
            # creator and pooled connections: the wrong one gets presented.
            raise ValueError(
                f"the alias {DEFAULT_ALIAS!r} is reserved for the default identity"
            )
        self.rolesInUse = rolesInUse
        self._creators: dict[
            tuple[str, str | None], IOpenSSLClientConnectionCreator
        ] = {}
        # One context per identity, shared by all hosts: loading the trust
        # root into a context is the costly part.
        self._contexts: dict[str | None, SSL.Context] = {}

    def replace(self, other: Origination) -> None:
        """
        Take the trust root and client identities of C{other} (the same
        configuration, loaded again), for the requests that follow; the
        cached contexts and connection creators, made with the old
        material, are dropped.  Connections already made keep what they
        were made with.
        """
        self.trustRoot = other.trustRoot
        self.default = other.default
        self.aliases = other.aliases
        self._creators = {}
        self._contexts = {}

    def identity(self, alias: str | None) -> ClientIdentity | None:
        """
        The identity to present: the named one, or the default (also named
        C{default}, as in webhook-sentry).

        @raise ProxyError: (1010) for an unknown alias.
        """
        if alias is None:
            return self.default
        if alias == DEFAULT_ALIAS and self.default is not None:
            return self.default
        try:
            return self.aliases[alias]
        except KeyError:
            raise ProxyError(
                Reason.UNKNOWN_CLIENT_CERT,
                f"Client certificate alias {alias!r} is not configured",
            ) from None

    def permit(self, identity: ClientIdentity | None, role: str | None) -> None:
        """
        Check that a client of C{role} may present C{identity}: the default
        identity is the proxy's own and any client may present it; an
        alias bound to roles only those roles may; an alias bound to none
        any client may only in a deployment without roles.  A client
        without a role gets no alias once roles exist.

        @raise ProxyError: (1016) when it may not.
        """
        if identity is None or identity is self.default:
            return
        if identity.roles is None:
            if not self.rolesInUse:
                return
        elif role and role in identity.roles:
            return
        who = f"role {role!r}" if role else "a client without a role"
        raise ProxyError(
            Reason.CLIENT_CERT_NOT_PERMITTED,
            f"Client certificate alias {identity.alias!r} is not permitted for {who}",
        )

    def creator(
        self, host: str, identity: ClientIdentity | None
    ) -> IOpenSSLClientConnectionCreator:
        """
        The connection creator for C{host} (SNI and the name verified),
        presenting C{identity}.

        @param host: a host as L{proxy_app.target.normalizeHost} gives it:
            a lower-case ASCII name, or an IP literal without brackets.
        @raise UnicodeError: for a name IDNA 2008 refuses in an A-label
            (C{xn--jv8h}, an emoji), which can be neither sent as SNI nor
            checked against a certificate.
        """
        alias = identity.alias if identity is not None else None
        key = (host, alias)
        creator = self._creators.get(key)
        if creator is None:
            if len(self._creators) > 4096:
                self._creators.clear()
            context = self._contexts.get(alias)
            if context is None:
                context = self._contexts[alias] = clientContext(
                    self.trustRoot, identity
                )
            creator = ClientConnectionCreator(context, host)
            self._creators[key] = creator
        return creator


def clientContext(trustRoot: Any, identity: ClientIdentity | None) -> SSL.Context:
    """
    The OpenSSL context for originating TLS with one client identity, to
    any host: it trusts C{trustRoot}, presents C{identity} to destinations
    that ask, and speaks TLS 1.2 at least.  Each connection then gets its
    own verify callback (L{ClientConnectionCreator}).

    Twisted's public L{ssl.CertificateOptions} builds it, for its choice
    of ciphers, curves and options.  Sharing it between hosts shares no
    sessions: OpenSSL resumes a client session only when asked to, and
    nothing asks, so every handshake runs the verify callback.

    @param trustRoot: an C{IOpenSSLTrustRoot} (L{loadTrustRoot}), or
        L{None} for the platform's (as L{ssl.optionsForClientTLS} does):
        never no verification.
    """
    options: dict[str, Any] = {
        "trustRoot": trustRoot if trustRoot is not None else ssl.platformTrust(),
        "raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
    }
    if identity is not None:
        options["privateKey"] = identity.certificate.privateKey.original
        options["certificate"] = identity.certificate.original
    return ssl.CertificateOptions(**options).getContext()


@implementer(IOpenSSLClientConnectionCreator)
class ClientConnectionCreator:
    """
    TLS client connections to one host: its name as SNI, and its
    certificate verified against the context's trust root and then against
    the host name (or, for an IP literal, its IP address) with
    service-identity.

    Verification happens in OpenSSL's verify callback, during the
    handshake, rather than once it is done: a peer whose certificate is
    for another name is refused before it is sent the client certificate,
    and before the TLS transport tells anyone the handshake completed.
    Every refusal is reported through the TLS transport's
    C{failVerification}, so that the connection is lost with a
    L{CertificateRefused} or L{HostnameMismatch} saying why, rather than
    OpenSSL's bare "certificate verify failed".

    Names are accepted as curl and browsers accept them: ASCII labels of
    letters, digits, hyphens and underscores (C{foo_bar.example.com},
    C{r3---sn-x.example}), which service-identity matches exactly or
    against a wildcard.  A-labels (C{xn--…}) must be valid IDNA 2008.

    @ivar host: the host, as given.
    """

    def __init__(self, context: SSL.Context, host: str) -> None:
        self.host = host
        self._context = context
        self._expected: ServiceID
        self._serverName: bytes | None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            self._serverName = _serverName(host)
            self._expected = DNS_ID(host)
        else:
            # An IP literal is never sent as SNI (RFC 6066, section 3).
            self._serverName = None
            self._expected = IPAddress_ID(str(address))

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A new connection to the host, for C{tlsProtocol} (a
        C{TLSMemoryBIOProtocol}).
        """
        connection = SSL.Connection(self._context, None)
        check = _PeerCheck(self.host, self._expected, tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, check.callback
        )
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        return connection


def _serverName(host: str) -> bytes:
    """
    The SNI bytes of a host name, checking its A-labels.

    @raise UnicodeError: for a name IDNA 2008 refuses in an A-label, or one
        that is not ASCII and not valid IDNA 2008.
    """
    if not host.isascii():
        return idna.encode(host)
    for label in host.split("."):
        if label[:4].lower() == "xn--":
            # idna decodes an A-label to check the U-label it stands for.
            idna.encode(label)
        elif not _LDH_UNDERSCORE.match(label):
            raise UnicodeError(f"label {label!r} is not a host name label")
    return host.encode("ascii")


_LDH_UNDERSCORE = re.compile(r"^[A-Za-z0-9_-]{1,63}\Z")


class _PeerCheck:
    """
    What one connection expects of its peer, and OpenSSL's verify callback
    for that connection.

    @ivar protocol: the TLS transport to fail, until the check is over.
    """

    __slots__ = ("host", "expected", "protocol")

    def __init__(self, host: str, expected: ServiceID, protocol: Any) -> None:
        self.host = host
        self.expected = expected
        self.protocol = protocol

    def callback(
        self,
        connection: SSL.Connection,
        certificate: crypto.X509,
        error: int,
        depth: int,
        ok: int,
    ) -> bool:
        """
        OpenSSL's verify callback: L{verify}, with any failure of its own
        logged and refusing the peer.  (An exception raised here would be
        kept by pyOpenSSL and raised again out of the handshake, where the
        TLS transport does not expect it.)
        """
        try:
            return self.verify(certificate, error, depth, bool(ok))
        except Exception:
            failure = Failure()
            log.failure(
                "Verifying the certificate of {host} failed", failure, host=self.host
            )
            self.refuse(failure)
            return False

    def verify(
        self, certificate: crypto.X509, error: int, depth: int, ok: bool
    ) -> bool:
        """
        Judge one certificate of the peer's chain, as OpenSSL's verify
        callback: OpenSSL's own verdict first, and then, for the leaf of a
        trusted chain, the name.

        @return: whether to go on with the handshake.
        """
        if not ok:
            # An untrusted certificate's names are the peer's say-so: report
            # why the chain was refused, not what it claims to be.
            self.refuse(Failure(CertificateRefused(error)))
            return False
        if depth != 0:
            return True
        try:
            verify_service_identity(extract_patterns(certificate), [self.expected], [])
        except VerificationError:
            self.refuse(
                Failure(HostnameMismatch(self.host, _certificateNames(certificate)))
            )
            return False
        # Done with the protocol: the connection should not keep it.
        self.protocol = None
        return True

    def refuse(self, reason: Failure) -> None:
        """
        Fail the TLS transport's connection with C{reason}, once.
        """
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.failVerification(reason)


class CertificateRefused(Exception):
    """
    OpenSSL refused the peer's certificate chain.

    @ivar code: OpenSSL's X.509 verification result (C{X509_V_ERR_*}).
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code

    def __str__(self) -> str:
        if self.code in _VERIFY_ERRORS:
            return _VERIFY_ERRORS[self.code]
        return (
            f"X.509 verification error {self.code}"
            if self.code
            else "certificate verify failed"
        )


class HostnameMismatch(Exception):
    """
    The peer's certificate, from a trusted CA, is for other names.

    @ivar wanted: the host (or IP literal) expected.
    @ivar names: the names the certificate is for (at most five).
    """

    def __init__(self, wanted: str, names: list[str]) -> None:
        super().__init__(wanted, names)
        self.wanted = wanted
        self.names = names

    def __str__(self) -> str:
        detail = f"hostname mismatch: wanted {self.wanted}"
        if self.names:
            detail += f", certificate is for {', '.join(self.names)}"
        return detail


# X.509 verification results, as OpenSSL words them (x509_txt.c), for the
# failures a webhook sender meets.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def tlsError(failure: Failure, host: str, where: str) -> ProxyError:
    """
    Translate a failed TLS handshake into the L{ProxyError} the client sees:
    1007 when the certificate was refused (untrusted, expired, wrong name),
    1005 for any other handshake failure.  The failure itself says why (see
    L{ClientConnectionCreator}).
    """
    if failure.check(CertificateRefused, HostnameMismatch):
        return ProxyError(
            Reason.CERTIFICATE_INVALID,
            f"TLS certificate of {where} is not valid: {failure.value}",
        )
    if failure.check(VerificationError):
        return ProxyError(
            Reason.CERTIFICATE_INVALID,
            f"TLS certificate of {where} is not valid: hostname mismatch: wanted "
            f"{host}",
        )
    if isinstance(failure.value, SSL.Error):
        reasons = _sslReason(failure.value)
        if "certificate verify failed" in reasons:
            return ProxyError(
                Reason.CERTIFICATE_INVALID,
                f"TLS certificate of {where} is not valid: certificate verify failed",
            )
        return ProxyError(
            Reason.TLS_HANDSHAKE_FAILED, f"TLS handshake with {where} failed: {reasons}"
        )
    return ProxyError(
        Reason.TLS_HANDSHAKE_FAILED,
        f"TLS handshake with {where} failed: "
        f"{failure.getErrorMessage() or type(failure.value).__name__}",
    )


def _sslReason(error: SSL.Error) -> str:
    args = error.args[0] if error.args else None
    if isinstance(args, list) and args:
        return "; ".join(item[-1] for item in args if item and item[-1]) or str(error)
    return str(error) or "connection closed during the handshake"


def _certificateNames(certificate: Any) -> list[str]:
    """
    The names a certificate is for: its subjectAltName entries, else its
    subject CN.
    """
    from cryptography import x509

    try:
        cert = certificate.to_cryptography()
        try:
            san = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
            names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
            names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = [
                str(a.value)
                for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            ]
    except Exception:
        return []
    return names[:5]


ROLE_SOURCES = ("cn", "ou", "uri-san")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CertificateRole:
    """
    Where a TLS listener takes a verified client certificate's role from
    (the listener's C{role_from}).

      - C{cn}: the subject's common name, as Smokescreen does.
      - C{ou}: the subject's organizational unit, when it has exactly one.
      - C{uri-san}: the certificate's one URI subjectAltName, as a SPIFFE
        X.509-SVID carries it: the whole SPIFFE ID (C{spiffe://...}), or,
        with C{prefix}, what follows the prefix.

    A certificate without the chosen field, or with more than one value
    for it (two OUs, two URIs: which would be the role?), gets no role,
    and the ACL's missing-role behaviour decides.

    @ivar source: one of L{ROLE_SOURCES}.
    @ivar prefix: for C{uri-san}, the start every URI must have (ending
        in C{/}, so that C{spiffe://example.org/ns/} cannot match
        C{spiffe://example.org.evil/...}); L{None} for the whole ID.
    """

    source: str = "cn"
    prefix: str | None = None

    def __call__(self, certificate: crypto.X509) -> str | None:
        """
        The role of C{certificate} (already verified by the handshake), or
        L{None}.
        """
        if self.source == "cn":
            return certificate.get_subject().CN
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        parsed = certificate.to_cryptography()
        if self.source == "ou":
            units = parsed.subject.get_attributes_for_oid(
                NameOID.ORGANIZATIONAL_UNIT_NAME
            )
            value = units[0].value if len(units) == 1 else None
            return value if isinstance(value, str) and value else None
        try:
            extension = parsed.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
        except x509.ExtensionNotFound:
            return None
        uris = extension.value.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            return None
        uri = uris[0]
        if self.prefix is None:
            return uri if uri.startswith("spiffe://") and len(uri) > 9 else None
        if not uri.startswith(self.prefix):
            return None
        return uri[len(self.prefix) :] or None


def serverOptions(listener: Any) -> ssl.CertificateOptions:
    """
    The TLS options of a L{proxy_app.config.TLSListener}: its certificate
    and key, TLS 1.2 at least, and, when it asks for client certificates,
    the CA they must chain to and the CRL they are checked against.

    @raise TLSConfigError: naming the file at fault.
    """
    identity = loadClientIdentity("listener", listener.cert, listener.key)
    options: dict[str, Any] = {
        "privateKey": identity.certificate.privateKey.original,
        "certificate": identity.certificate.original,
        "raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
    }
    if listener.clientCert != "none":
        authorities = [c.original for c in loadCertificates(listener.clientCA)]
        options.update(
            verify=True,
            caCerts=authorities,
            requireCertificate=listener.clientCert == "required",
        )
    crls = []
    if listener.crl:
        from cryptography import x509

        data = _read(listener.crl)
        try:
            crls.append(x509.load_pem_x509_crl(data))
        except ValueError:
            try:
                crls.append(x509.load_der_x509_crl(data))
            except ValueError:
                raise TLSConfigError(
                    f"{listener.crl!r}: not a PEM or DER CRL"
                ) from None
    return _RevocationCheckingOptions(crls, **options)


@implementer(IOpenSSLServerConnectionCreator)
class ListenerTLS:
    """
    A TLS listener's context, swapped whole on L{reload}: each new
    handshake takes the context in force when it starts, and a connection
    keeps the one it began with, so that rotating the certificate, the
    key, the client CA or the CRL needs no restart and cuts nothing.

    @ivar listener: the L{proxy_app.config.TLSListener}.
    """

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        self._context = self._load()

    def _load(self) -> SSL.Context:
        options = serverOptions(self.listener)
        try:
            return options.getContext()
        except SSL.Error as e:
            raise TLSConfigError(
                f"{self.listener.cert!r}: unusable: {_sslReason(e)}"
            ) from None

    def files(self) -> list[str]:
        """
        The files L{reload} reads.
        """
        listener = self.listener
        paths = [listener.cert, listener.key]
        if listener.clientCert != "none" and listener.clientCA:
            paths.append(listener.clientCA)
        if listener.crl:
            paths.append(listener.crl)
        return paths

    def reload(self) -> None:
        """
        Read every file again and, only if all of them load, put the new
        context in force for the handshakes that follow.

        @raise TLSConfigError: naming the file at fault; the old context
            stays.
        """
        self._context = self._load()

    def getContext(self) -> SSL.Context:
        """
        The context in force (for code that wants the older interface).
        """
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A server connection for one new client, on the context in force.
        """
        return SSL.Connection(self._context, None)


class _RevocationCheckingOptions(ssl.CertificateOptions):
    """
    Certificate options that also refuse client certificates a CRL has
    revoked.  (Smokescreen loaded CRLs and never enforced them.)
    """

    def __init__(self, crls: list[Any], **options: Any) -> None:
        super().__init__(**options)
        self._crls = crls

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        if self._crls:
            store = context.get_cert_store()
            if store is not None:
                for crl in self._crls:
                    store.add_crl(crl)
                store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
            self._crls = []
        return context
