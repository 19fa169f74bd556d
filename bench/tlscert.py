"""TLS material for ``--tls``: a throwaway self-signed certificate, and OpenSSL settings.

The certificate is made once per bench run in its temporary directory and given to every proxy,
so they all sign handshakes with the same key. ``wrk`` does not verify certificates.

wrk keeps each connection's TLS session and offers it when it reconnects, so with
``Connection: close`` every new connection is a *resumed* handshake (TLS 1.3, PSK with ECDHE:
no certificate signature) wherever the server issued a session ticket. For full handshakes the
proxies are set not to issue tickets: HAProxy ``no-tls-tickets`` and no session cache, nginx
``ssl_session_tickets off`` (it has no session cache by default), and l4gw, which has no
setting for it, an OpenSSL configuration file (``OPENSSL_CONF``) with ``NumTickets = 0``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KEY_TYPES = ("ec256", "rsa2048")


@dataclass(frozen=True)
class TLSFiles:
    """The certificate, its key, and both in one file (HAProxy's ``crt``)."""

    key_type: str
    cert: Path
    key: Path
    pem: Path
    no_tickets_conf: Path  # OPENSSL_CONF for l4gw: issue no session tickets (full handshakes)


def make_tls_files(directory: Path, key_type: str = "ec256") -> TLSFiles:
    """A self-signed certificate for ``localhost`` and ``127.0.0.1``, valid for two days."""
    if key_type == "ec256":
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = ec.generate_private_key(
            ec.SECP256R1()
        )
    elif key_type == "rsa2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unknown key type {key_type!r}; choose from {', '.join(KEY_TYPES)}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(
        key_type=key_type,
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        pem=directory / "cert+key.pem",
        no_tickets_conf=directory / "openssl-no-tickets.cnf",
    )
    files.cert.write_bytes(cert_pem)
    files.key.write_bytes(key_pem)
    files.key.chmod(0o600)
    files.pem.write_bytes(cert_pem + key_pem)
    files.pem.chmod(0o600)
    # Applied by OpenSSL to every SSL_CTX the process creates. No tickets: nothing to resume
    # with in TLS 1.3 (wrk negotiates 1.3, where session IDs do not resume).
    files.no_tickets_conf.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\n"
        "ssl_conf = ssl_sect\n"
        "[ssl_sect]\n"
        "system_default = system_default_sect\n"
        "[system_default_sect]\n"
        "NumTickets = 0\n"
        "Options = -SessionTicket\n"
    )
    return files
