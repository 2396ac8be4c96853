"""
Certificates generated at test time: a CA, server certificates (good, wrong
name, expired), client certificates, and a CRL.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_NOW = datetime.datetime.now(datetime.timezone.utc)
_DAY = datetime.timedelta(days=1)


def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: Any, cert: x509.Certificate) -> tuple[bytes, bytes]:
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class Authority:
    """
    A test CA that issues certificates.
    """

    def __init__(self, name: str = "egressproxy test CA") -> None:
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - _DAY)
            .not_valid_after(_NOW + 30 * _DAY)
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.revoked: list[int] = []

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def keyPEM(self) -> bytes:
        """
        The CA's private key, PKCS#8 PEM, unencrypted (for a proxy that
        issues with it: C{mitm.ca_key}).
        """
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def issue(
        self,
        commonName: str,
        names: tuple[str, ...] = (),
        expired: bool = False,
        client: bool = False,
        organizationalUnit: str | tuple[str, ...] | None = None,
        uris: tuple[str, ...] = (),
    ) -> tuple[bytes, bytes, int]:
        """
        Issue a certificate.

        @param names: DNS names and IP addresses for the subjectAltName.
        @param organizationalUnit: one OU, or several.
        @param uris: URIs for the subjectAltName (a SPIFFE ID).
        @return: certificate PEM, key PEM, serial number.
        """
        key = _key()
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, commonName)]
        units = (
            (organizationalUnit,)
            if isinstance(organizationalUnit, str)
            else organizationalUnit or ()
        )
        for unit in units:
            attributes.append(
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit)
            )
        serial = x509.random_serial_number()
        start, end = (
            (_NOW - 10 * _DAY, _NOW - 2 * _DAY)
            if expired
            else (_NOW - _DAY, _NOW + 10 * _DAY)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
        )
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        sans.extend(x509.UniformResourceIdentifier(uri) for uri in uris)
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(sans), critical=False
            )
        usage = (
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
            if client
            else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        certPEM, keyPEM = _pem(key, cert)
        return certPEM, keyPEM, serial

    def crl(self) -> bytes:
        """
        A CRL revoking every serial in C{self.revoked}.
        """
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(_NOW - _DAY)
            .next_update(_NOW + _DAY)
        )
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(_NOW - _DAY)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM
        )
