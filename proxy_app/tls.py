"""
TLS for the proxy: the trust root and client identities for originating
TLS to destinations, and the translation of TLS failures into reason codes.

Origination follows webhook-sentry: the client sends plain C{http://} with
C{X-WhSentry-TLS: true} (or an absolute C{https://} URI) and the proxy
speaks TLS to the vetted address, verifying the certificate against
certifi's Mozilla bundle (every certificate in it) and the host name with
service-identity, sending the host name as SNI, TLS 1.2 at least.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attr
import certifi
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.reasons import ProxyError, Reason

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
        raise TLSConfigError(f"{keyPath!r}: not a PEM private key (or it is encrypted)") from None
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
    return ClientIdentity(alias, certificate, None if roles is None else frozenset(roles))


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
            raise ValueError(f"the alias {DEFAULT_ALIAS!r} is reserved for the default identity")
        self.rolesInUse = rolesInUse
        self._creators: dict[tuple[str, str | None], IOpenSSLClientConnectionCreator] = {}

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

    def creator(self, host: str, identity: ClientIdentity | None) -> IOpenSSLClientConnectionCreator:
        """
        The connection creator for C{host} (SNI and the name verified),
        presenting C{identity}.
        """
        key = (host, identity.alias if identity is not None else None)
        creator = self._creators.get(key)
        if creator is None:
            if len(self._creators) > 4096:
                self._creators.clear()
            creator = _NameRecordingCreator(
                ssl.optionsForClientTLS(
                    host,
                    trustRoot=self.trustRoot,
                    clientCertificate=identity.certificate if identity is not None else None,
                    extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
                )
            )
            self._creators[key] = creator
        return creator


PEER_NAMES = "egressproxyPeerNames"
VERIFY_ERROR = "egressproxyVerifyError"


@implementer(IOpenSSLClientConnectionCreator)
class _NameRecordingCreator:
    """
    Twisted's client TLS options, plus a note, on the TLS transport, of the
    peer certificate's names and OpenSSL's verification error: when a
    check fails Twisted aborts the connection and the certificate is gone,
    but the error should say what was wrong and whom the certificate was
    for.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        try:
            # Twisted's verify callback checks the name; it is private, so
            # do without the note if it ever moves.
            from twisted.internet._sslverify import _verifyCB
        except ImportError:
            return connection
        inner = self._inner
        twistedCallback = _verifyCB(
            tlsProtocol, inner._hostnameIsDnsName, inner._hostnameASCII
        )

        def verifyCallback(conn: SSL.Connection, cert: Any, err: int, depth: int, ok: Any) -> Any:
            if depth == 0:
                setattr(tlsProtocol, PEER_NAMES, _certificateNames(cert))
            if err and not getattr(tlsProtocol, VERIFY_ERROR, 0):
                setattr(tlsProtocol, VERIFY_ERROR, err)
            return twistedCallback(conn, cert, err, depth, ok)

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verifyCallback)
        return connection


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


def tlsError(failure: Failure, host: str, where: str, transport: Any = None) -> ProxyError:
    """
    Translate a failed TLS handshake into the L{ProxyError} the client sees:
    1007 when the certificate was refused (untrusted, expired, wrong name),
    1005 for any other handshake failure.

    @param transport: the TLS transport, to read the verification result
        and the certificate's names from.
    """
    from service_identity import VerificationError

    if failure.check(VerificationError):
        names = getattr(transport, PEER_NAMES, [])
        detail = f"hostname mismatch: wanted {host}"
        if names:
            detail += f", certificate is for {', '.join(names)}"
        return ProxyError(
            Reason.CERTIFICATE_INVALID,
            f"TLS certificate of {where} is not valid: {detail}",
        )
    if isinstance(failure.value, SSL.Error):
        reasons = _sslReason(failure.value)
        if "certificate verify failed" in reasons:
            reason = _verifyResult(transport)
            return ProxyError(
                Reason.CERTIFICATE_INVALID,
                f"TLS certificate of {where} is not valid: {reason}",
            )
        return ProxyError(
            Reason.TLS_HANDSHAKE_FAILED, f"TLS handshake with {where} failed: {reasons}"
        )
    return ProxyError(
        Reason.TLS_HANDSHAKE_FAILED,
        f"TLS handshake with {where} failed: "
        f"{failure.getErrorMessage() or type(failure.value).__name__}",
    )


def _verifyResult(transport: Any) -> str:
    """
    Why OpenSSL refused the peer's certificate, in OpenSSL's words.
    """
    code = getattr(transport, VERIFY_ERROR, 0)
    if code:
        return _VERIFY_ERRORS.get(code, f"X.509 verification error {code}")
    return "certificate verify failed"


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
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
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
                raise TLSConfigError(f"{listener.crl!r}: not a PEM or DER CRL") from None
    return _RevocationCheckingOptions(crls, **options)


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
