"""Checks on values that end up in a station's configuration.

A CSMS URL is written verbatim into the station (ChangeConfiguration) and the firmware keeps
it as it is: a stray space, a newline pasted from a spreadsheet or a quote makes the station
unable to reach the new CSMS after its reboot, and by then we can no longer talk to it. So the
rules are strict, and the same function serves the model, the admin, ``add_csms`` and the
migration pre-flight.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import SplitResult, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from django.core.exceptions import ValidationError

# OCPP 1.6 ChangeConfiguration.value is a CiString500: a longer URL cannot even be sent.
CSMS_URL_MAX_LENGTH = 500
CSMS_URL_SCHEMES = ("ws", "wss")
# A root CA certificate is a few KiB: a file far larger is the wrong file.
ROOT_CA_MAX_BYTES = 64 * 1024

# Straight, typographic and CJK quotes: spreadsheets and word processors love to add them.
_QUOTES = frozenset(
    "\"'`\u00ab\u00bb\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u2039\u203a\u300c\u300d\uff02\uff07"
)
# Separators plus control and format characters (zero-width space, BOM, ...): str.isspace()
# misses the invisible ones, which are the hardest to spot in an admin form.
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})


def _describe(char: str) -> str:
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def csms_url_problems(url: object) -> list[str]:
    """Every reason why ``url`` cannot be given to a station as its CSMS URL (empty if fine)."""
    if not isinstance(url, str):
        return ["The URL must be text."]
    if not url:
        return ["The URL is empty."]
    problems: list[str] = []
    if len(url) > CSMS_URL_MAX_LENGTH:
        problems.append(
            f"The URL is {len(url)} characters long; stations accept at most {CSMS_URL_MAX_LENGTH}."
        )
    for position, char in enumerate(url):
        if char.isspace() or unicodedata.category(char) in _INVISIBLE_CATEGORIES:
            problems.append(
                f"The URL contains whitespace or an invisible character ({_describe(char)}) "
                f"at position {position + 1}; remove it."
            )
            break
    for position, char in enumerate(url):
        if char in _QUOTES:
            problems.append(
                f"The URL contains a quote character ({char}) at position {position + 1}; "
                "remove it."
            )
            break
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError as exc:
        problems.append(f"The URL cannot be parsed: {exc}.")
        return problems
    scheme = parts.scheme.lower()
    if scheme not in CSMS_URL_SCHEMES:
        shown = f"'{parts.scheme}://'" if parts.scheme else "no scheme"
        problems.append(f"The URL must start with ws:// or wss:// (it has {shown}).")
    if not hostname:
        problems.append("The URL has no host (expected ws://host/path or wss://host/path).")
    return problems


def upstream_url_problems(url: object) -> list[str]:
    """Every reason why ``url`` cannot be recorded as a CSMS's upstream (empty if fine).

    The inventory's upstream is for operators and reports, shown in the admin in clear: it
    never carries credentials. The gateway reads the per-station ones from its own file.
    """
    problems = csms_url_problems(url)
    if problems:
        return problems
    assert isinstance(url, str)
    if "@" in urlsplit(url).netloc:
        problems.append(
            "The upstream URL contains credentials (user:password@): remove them and put "
            "per-station credentials in the gateway's --upstream-auth-file instead."
        )
    return problems


def same_csms_url(one: str, other: str) -> bool:
    """Whether two CSMS URLs reach the same endpoint (scheme, host, port and path; case of
    scheme and host, a default port and a trailing slash do not matter)."""
    try:
        a, b = urlsplit(one), urlsplit(other)
        ports = (a.port, b.port)
    except ValueError:
        return one == other
    defaults = {"ws": 80, "wss": 443}

    def key(parts: SplitResult, port: int | None) -> tuple[str, str, int | None, str]:
        scheme = parts.scheme.lower()
        return (
            scheme,
            (parts.hostname or "").lower(),
            port or defaults.get(scheme),
            parts.path.rstrip("/"),
        )

    return key(a, ports[0]) == key(b, ports[1])


def validate_upstream_url(value: object) -> None:
    """Django validator: raise ValidationError with every problem of the upstream URL."""
    problems = upstream_url_problems(value)
    if problems:
        raise ValidationError(problems, code="invalid_upstream_url")


def validate_csms_url(value: object) -> None:
    """Django validator: raise ValidationError with every problem of the URL."""
    problems = csms_url_problems(value)
    if problems:
        raise ValidationError(problems, code="invalid_csms_url")


def root_ca_problems(pem: object) -> list[str]:
    """Every reason why ``pem`` is not one CA certificate in PEM form (empty if fine)."""
    if not isinstance(pem, str):
        return ["The certificate must be text (PEM)."]
    if not pem.strip():
        return []  # no root CA: nothing to check
    try:
        certificate = x509.load_pem_x509_certificate(pem.strip().encode())
    except ValueError as exc:
        return [f"This is not a PEM certificate ({exc})."]
    if pem.count("-----BEGIN CERTIFICATE-----") > 1:
        return ["Give one certificate: the root CA alone, not a chain."]
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return ["The certificate has no BasicConstraints extension: it is not a CA certificate."]
    if not constraints.value.ca:
        return ["The certificate is not a CA certificate (BasicConstraints CA is false)."]
    return []


def validate_root_ca_pem(value: object) -> None:
    """Django validator for CsmsBackend.root_ca_pem."""
    problems = root_ca_problems(value)
    if problems:
        raise ValidationError(problems, code="invalid_root_ca")


def root_ca_summary(pem: str) -> str:
    """'CN=…, O=… (SHA-256 AB:CD:…)' of a valid root CA PEM: what an operator compares with
    the certificate their CSMS vendor gave them."""
    certificate = x509.load_pem_x509_certificate(pem.strip().encode())
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    return f"{certificate.subject.rfc4514_string()} (SHA-256 {fingerprint})"


def root_ca_pem_from_file(data: bytes) -> str:
    """The PEM of a root CA file as operators get it: PEM (also with the text `openssl x509
    -text` puts before it) or DER (.cer/.crt from Windows tools). Raises ValueError (with
    the reason) for anything that is not one CA certificate."""
    if not data.strip():
        raise ValueError("The file is empty.")
    if b"-----BEGIN" in data:
        # Latin-1 never fails: the checks below say what is wrong with the content.
        pem = data.decode("latin-1")
    else:
        try:
            certificate = x509.load_der_x509_certificate(data)
        except ValueError:
            raise ValueError(
                "This is neither a PEM nor a DER certificate (expected a file starting with "
                "-----BEGIN CERTIFICATE-----)."
            ) from None
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    if "PRIVATE KEY-----" in pem:
        # It would be stored in the database and shown to every operator: refuse it whole.
        raise ValueError(
            "The file contains a private key: give the CA certificate alone, and keep the key "
            "secret."
        )
    problems = root_ca_problems(pem)
    if problems:
        raise ValueError(" ".join(problems))
    # Stored as the certificate alone: no surrounding text, one canonical encoding.
    certificate = x509.load_pem_x509_certificate(pem.strip().encode("latin-1"))
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
