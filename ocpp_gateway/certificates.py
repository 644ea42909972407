"""Certificate identities as the OCPP 1.6 security extension names them (CertificateHashData).

GetInstalledCertificateIds answers with one CertificateHashDataType per installed root:
hashAlgorithm, issuerNameHash, issuerKeyHash and serialNumber, defined as RFC 6960's CertID:
the hash of the DER-encoded issuer Name, the hash of the issuer's public key bits (the
subjectPublicKey BIT STRING, not the whole SubjectPublicKeyInfo) and the serial number. For
a self-signed root the issuer is the certificate itself.

Plain Python on `cryptography`: the Django side and the station simulator both use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

DEFAULT_HASH_ALGORITHM = "SHA256"
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
}


class CertificateError(ValueError):
    """Not a usable certificate (bad PEM, unknown hash algorithm, issuer unknown)."""


@dataclass(frozen=True)
class CertificateHashData:
    """One CertificateHashDataType; hex strings as a station sends them (any case)."""

    hash_algorithm: str
    issuer_name_hash: str
    issuer_key_hash: str
    serial_number: str

    def as_payload(self) -> dict[str, str]:
        """snake_case, as the ``ocpp`` dataclasses and the command bridge name the fields."""
        return {
            "hash_algorithm": self.hash_algorithm,
            "issuer_name_hash": self.issuer_name_hash,
            "issuer_key_hash": self.issuer_key_hash,
            "serial_number": self.serial_number,
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> CertificateHashData:
        """From snake_case (the bridge) or camelCase (the wire) keys."""

        def pick(snake: str, camel: str) -> str:
            value = data.get(snake, data.get(camel))
            if not isinstance(value, str):
                raise CertificateError(f"certificate hash data lacks {camel}")
            return value

        return cls(
            hash_algorithm=pick("hash_algorithm", "hashAlgorithm"),
            issuer_name_hash=pick("issuer_name_hash", "issuerNameHash"),
            issuer_key_hash=pick("issuer_key_hash", "issuerKeyHash"),
            serial_number=pick("serial_number", "serialNumber"),
        )

    def matches(self, other: CertificateHashData) -> bool:
        """Same certificate: hex compared case-insensitively, serials without leading zeros
        (firmware differs in both)."""
        return (
            self.hash_algorithm.upper() == other.hash_algorithm.upper()
            and _hex(self.issuer_name_hash) == _hex(other.issuer_name_hash)
            and _hex(self.issuer_key_hash) == _hex(other.issuer_key_hash)
            and _serial(self.serial_number) == _serial(other.serial_number)
        )


def _hex(value: str) -> str:
    return value.strip().lower()


def _serial(value: str) -> str:
    return value.strip().lower().lstrip("0") or "0"


def _hash_type(algorithm: str) -> type[hashes.HashAlgorithm]:
    try:
        return _HASHES[algorithm.upper()]
    except KeyError:
        raise CertificateError(f"unknown hash algorithm {algorithm!r}") from None


def load_certificates(pem: str | bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM text; raises CertificateError when there is none."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    if not certificates:
        raise CertificateError("not a PEM certificate")
    return certificates


def load_certificate(pem: str | bytes) -> x509.Certificate:
    """The one certificate of a PEM text (InstallCertificate carries exactly one)."""
    certificates = load_certificates(pem)
    if len(certificates) != 1:
        raise CertificateError(f"expected one certificate, found {len(certificates)}")
    return certificates[0]


def certificate_pem(certificate: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return certificate.public_bytes(Encoding.PEM).decode("ascii")


def is_self_issued(certificate: x509.Certificate) -> bool:
    return certificate.issuer == certificate.subject


def is_signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` issued ``certificate``: its subject is the issuer name and its key
    verifies the signature."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_self_signed(certificate: x509.Certificate) -> bool:
    return is_signed_by(certificate, certificate)


def signed_by_any(certificate: x509.Certificate, issuers: Iterable[x509.Certificate]) -> bool:
    return any(is_signed_by(certificate, issuer) for issuer in issuers)


def hash_data(
    certificate: x509.Certificate,
    *,
    issuer: x509.Certificate | None = None,
    algorithm: str = DEFAULT_HASH_ALGORITHM,
) -> CertificateHashData:
    """The certificate's CertificateHashData. Without ``issuer`` it must be self-issued
    (a root: its own key is the issuer key)."""
    if issuer is None:
        if not is_self_issued(certificate):
            raise CertificateError(
                "the issuer's certificate is needed for a certificate that is not self-issued"
            )
        issuer = certificate
    # cryptography's OCSP request builder computes RFC 6960's CertID: the same definition
    # the security extension uses, from a maintained implementation.
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, _hash_type(algorithm)())
        .build()
    )
    return CertificateHashData(
        hash_algorithm=algorithm.upper(),
        issuer_name_hash=request.issuer_name_hash.hex(),
        issuer_key_hash=request.issuer_key_hash.hex(),
        serial_number=format(certificate.serial_number, "x"),
    )


def name_hash(name: x509.Name, algorithm: str = DEFAULT_HASH_ALGORITHM) -> str:
    digest = hashes.Hash(_hash_type(algorithm)())
    digest.update(name.public_bytes())
    return digest.finalize().hex()


def identifies(data: CertificateHashData, certificate: x509.Certificate) -> bool:
    """Whether a station's hash data names this certificate (in the station's algorithm).

    The issuer key hash is compared when the certificate is self-issued (its own key);
    otherwise the issuer name and serial, which RFC 5280 makes unique, have to do.
    """
    try:
        if is_self_issued(certificate):
            return data.matches(hash_data(certificate, algorithm=data.hash_algorithm))
        return _hex(data.issuer_name_hash) == name_hash(
            certificate.issuer, data.hash_algorithm
        ) and _serial(data.serial_number) == _serial(format(certificate.serial_number, "x"))
    except CertificateError:
        return False


def issued_by_one_of(
    certificate: x509.Certificate, installed: Iterable[CertificateHashData]
) -> bool:
    """Whether one of the installed (self-signed) roots, known only by hash data, can have
    issued ``certificate``: a self-signed root's issuer name is its subject, so its issuer
    name hash must be the hash of ``certificate``'s issuer name.

    A self-signed ``certificate`` was signed by its own key, never by another root. Only
    names can be compared here; the station itself checks the signature.
    """
    if is_self_signed(certificate):
        return False
    for data in installed:
        try:
            if _hex(data.issuer_name_hash) == name_hash(certificate.issuer, data.hash_algorithm):
                return True
        except CertificateError:
            continue
    return False
