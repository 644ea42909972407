"""ocpp_gateway.certificates: CertificateHashData as RFC 6960's CertID, and signed-by checks."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization

from ocpp_gateway.certificates import (
    CertificateError,
    CertificateHashData,
    hash_data,
    identifies,
    is_self_signed,
    is_signed_by,
    issued_by_one_of,
    load_certificate,
    signed_by_any,
)
from tests.simulator.certs import make_root, make_signed_root


def test_it_hashes_the_issuer_name_and_key_bits_of_an_rsa_root_by_hand():
    root = make_root("Test RSA Root", rsa_key=True, serial=0x00_0A_BC_DE)
    cert = root.certificate
    # For RSA the subjectPublicKey BIT STRING holds the PKCS#1 RSAPublicKey.
    key_bits = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    data = hash_data(cert)
    assert data == CertificateHashData(
        hash_algorithm="SHA256",
        issuer_name_hash=hashlib.sha256(cert.issuer.public_bytes()).hexdigest(),
        issuer_key_hash=hashlib.sha256(key_bits).hexdigest(),
        serial_number="abcde",  # hex, no leading zeros, lower case
    )
    # Not the whole SubjectPublicKeyInfo: a common mistake that no station would match.
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert data.issuer_key_hash != hashlib.sha256(spki).hexdigest()


def test_it_hashes_an_ec_root_key_as_its_point_and_supports_sha384_and_sha512():
    cert = make_root("Test EC Root").certificate
    point = cert.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    for algorithm, digest in (("SHA384", hashlib.sha384), ("SHA512", hashlib.sha512)):
        data = hash_data(cert, algorithm=algorithm.lower())
        assert data.hash_algorithm == algorithm
        assert data.issuer_key_hash == digest(point).hexdigest()
        assert data.issuer_name_hash == digest(cert.issuer.public_bytes()).hexdigest()
    with pytest.raises(CertificateError, match="unknown hash algorithm"):
        hash_data(cert, algorithm="MD5")


def test_a_certificate_signed_by_another_is_named_by_its_issuer():
    old = make_root("Old Root")
    new = make_signed_root("New Root", old)
    with pytest.raises(CertificateError, match="issuer's certificate is needed"):
        hash_data(new.certificate)
    data = hash_data(new.certificate, issuer=old.certificate)
    assert data.issuer_name_hash == hash_data(old.certificate).issuer_name_hash
    assert data.issuer_key_hash == hash_data(old.certificate).issuer_key_hash
    assert data.serial_number == format(new.certificate.serial_number, "x")


def test_hash_data_compare_case_insensitively_and_without_leading_zeros():
    data = hash_data(make_root("Root", serial=0xABC).certificate)
    shouted = CertificateHashData.from_payload(
        {
            "hashAlgorithm": "sha256",
            "issuerNameHash": data.issuer_name_hash.upper(),
            "issuerKeyHash": data.issuer_key_hash.upper(),
            "serialNumber": "00ABC",
        }
    )
    assert data.matches(shouted) and shouted.matches(data)
    assert CertificateHashData.from_payload(data.as_payload()) == data
    other = hash_data(make_root("Root", serial=0xABC).certificate)  # same name, other key
    assert not data.matches(other)
    with pytest.raises(CertificateError, match="lacks issuerNameHash"):
        CertificateHashData.from_payload({"hashAlgorithm": "SHA256"})


def test_it_tells_who_signed_a_certificate():
    old, stranger = make_root("Old Root"), make_root("Stranger Root")
    new = make_signed_root("New Root", old)
    assert is_self_signed(old.certificate) and not is_self_signed(new.certificate)
    assert is_signed_by(new.certificate, old.certificate)
    assert not is_signed_by(new.certificate, stranger.certificate)
    assert signed_by_any(new.certificate, [stranger.certificate, old.certificate])
    assert not signed_by_any(stranger.certificate, [old.certificate])


def test_a_stations_hash_data_identifies_a_root_and_its_possible_issuers():
    old, stranger = make_root("Old Root"), make_root("Stranger Root")
    new = make_signed_root("New Root", old)
    installed = [hash_data(old.certificate)]
    assert identifies(installed[0], old.certificate)
    assert not identifies(installed[0], stranger.certificate)
    # As a station lists the new root once installed: named by the old one.
    assert identifies(hash_data(new.certificate, issuer=old.certificate), new.certificate)
    assert issued_by_one_of(new.certificate, installed)
    assert not issued_by_one_of(stranger.certificate, installed)
    # A self-signed root was signed by its own key, whatever the names say.
    assert not issued_by_one_of(old.certificate, installed)


def test_it_refuses_what_is_not_one_pem_certificate():
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        load_certificate("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError):
        load_certificate("hello")
    two = make_root("A").pem + make_root("B").pem
    with pytest.raises(CertificateError, match="expected one certificate, found 2"):
        load_certificate(two)
