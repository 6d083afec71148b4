"""Throwaway PKI for loopback TLS tests: a CA, a server certificate for 127.0.0.1 and a client certificate.

Everything is generated in memory with ``cryptography`` (EC P-256, so it takes milliseconds) and lives
only for the test session. ``ssl`` can only load certificates from files, so the server context writes
them to a private temporary directory and deletes it straight after loading.
"""

from __future__ import annotations

import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def _validity(days: int) -> tuple[datetime, datetime]:
    """The window a throwaway certificate is valid in. OpenSSL checks it against the real clock, while a
    pinned test run (tests/plugins/pinned_clock.py) mints at its travelled time: cover both clocks."""
    now = datetime.now(UTC)
    real = now
    try:
        from time_machine import escape_hatch
    except ImportError:  # the demo runs without the test tools
        pass
    else:
        if escape_hatch.is_travelling():
            real = datetime.fromtimestamp(escape_hatch.time.time(), UTC)
    return min(now, real) - timedelta(days=1), max(now, real) + timedelta(days=days)


@dataclass(frozen=True)
class CertKey:
    """A PEM certificate and its PEM private key (encrypted when ``password`` is set)."""

    cert_pem: str
    key_pem: str
    password: str | None = None


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "RU"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clinicsync tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        ("key_encipherment", "content_commitment", "data_encipherment", "encipher_only", "decipher_only"), False
    )
    return x509.KeyUsage(digital_signature=True, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca, **flags)


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()


@dataclass(frozen=True)
class ThrowawayCa:
    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(
        self,
        common_name: str,
        *,
        server_hosts: tuple[str, ...] = (),
        client: bool = False,
        password: str | None = None,
        days: int = 2,
    ) -> CertKey:
        """A leaf certificate: for TLS servers when ``server_hosts`` is given, for clients when ``client``."""
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = _validity(days)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        usages = []
        if server_hosts:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            names: list[x509.GeneralName] = []
            for host in server_hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return CertKey(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key, password), password)


def make_ca(name: str = "clinicsync test CA", days: int = 2) -> ThrowawayCa:
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ThrowawayCa(name, cert, key)


def _load_chain(context: ssl.SSLContext, pair: CertKey) -> None:
    with tempfile.TemporaryDirectory(prefix="clinicsync-test-tls-") as tmp:  # mode 0700
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_text(pair.cert_pem)
        key_path.write_text(pair.key_pem)
        key_path.chmod(0o600)
        context.load_cert_chain(cert_path, key_path, password=pair.password)


def server_context(server: CertKey, client_ca_pem: str | None) -> ssl.SSLContext:
    """A TLS server context; with ``client_ca_pem`` every client must present a certificate from that CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, server)
    if client_ca_pem is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca_pem)
    return context


def client_context(ca_pem: str, client: CertKey | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca_pem``, presenting ``client`` if given (for raw httpx calls)."""
    context = ssl.create_default_context(cadata=ca_pem)
    if client is not None:
        _load_chain(context, client)
    return context


@dataclass(frozen=True)
class LoopbackPki:
    ca: ThrowawayCa
    server: CertKey
    client: CertKey

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.server, self.ca.cert_pem)

    def client_context(self, with_cert: bool = True) -> ssl.SSLContext:
        return client_context(self.ca.cert_pem, self.client if with_cert else None)


def loopback_pki(name: str = "clinicsync test CA", client_name: str = "clinicsync-test-client") -> LoopbackPki:
    """A fresh CA with a server certificate for 127.0.0.1/localhost and a client certificate."""
    ca = make_ca(name)
    return LoopbackPki(ca, ca.issue("127.0.0.1", server_hosts=LOOPBACK_HOSTS), ca.issue(client_name, client=True))
