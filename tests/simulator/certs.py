"""Test certificate authorities made with `cryptography`: roots, a root signed by another
(what AdditionalRootCertificateCheck accepts), a self-signed certificate that is not a CA and
a server certificate for 127.0.0.1. The one builder of the tests' certificates (tests/fleet
uses it too)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ocpp_gateway.certificates import certificate_pem

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Ca:
    certificate: x509.Certificate
    key: Key

    @property
    def pem(self) -> str:
        return certificate_pem(self.certificate)

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    @property
    def sha256(self) -> str:
        """Colon-separated upper-case hex, as add_csms and the admin show it."""
        return self.certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: Key, serial: int | None):
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
    )


def _ca_extensions(builder: x509.CertificateBuilder, key: Key) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_root(common_name: str, *, rsa_key: bool = False, serial: int | None = None) -> Ca:
    """A self-signed root CA (EC P-256, or RSA 2048)."""
    key: Key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    name = _name(common_name)
    builder = _ca_extensions(_builder(name, name, key, serial), key)
    return Ca(builder.sign(key, hashes.SHA256()), key)


def make_self_signed_leaf(common_name: str) -> Ca:
    """A self-signed certificate that is not a CA (BasicConstraints ca=False): the wrong
    file to give as a root CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    builder = _builder(name, name, key, None).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    return Ca(builder.sign(key, hashes.SHA256()), key)


def make_signed_root(common_name: str, issuer: Ca) -> Ca:
    """A CA certificate with its own key, signed by ``issuer`` (a root rolled over)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _ca_extensions(
        _builder(_name(common_name), issuer.certificate.subject, key, None), key
    )
    return Ca(builder.sign(issuer.key, hashes.SHA256()), key)


def write_server_cert(ca: Ca, directory: Path, *, name: str = "server") -> tuple[Path, Path]:
    """A TLS server certificate for 127.0.0.1 issued by ``ca``; (certfile, keyfile)."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(_name("127.0.0.1"), ca.certificate.subject, key, None)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    certfile, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    certfile.write_text(certificate_pem(certificate))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile
