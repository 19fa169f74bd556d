"""TLS: server contexts for listeners (several certificates chosen by SNI), client contexts
toward nodes, and certificate inspection for ``check``, ``/status`` and metrics.

Server side (:func:`build_server_context`): one ``ssl.SSLContext`` per configured certificate,
all with the same settings. The first certificate is the default; an ``sni_callback`` on it
switches the connection to the certificate whose subjectAltName DNS names (the subject CN
when it has none) match the name the client sent: an exact name first, then a wildcard
``*.example.com``, which covers exactly one label (``a.example.com``, not ``example.com`` nor
``a.b.example.com``), as RFC 6125 says clients check it. No SNI, or no match, gets the
default certificate.

Settings: ``min_version`` (1.2 or 1.3), no TLS compression, no renegotiation, and for TLS 1.2
only ECDHE key exchange with AEAD ciphers (Mozilla's "intermediate" list). ALPN: http mode
offers only ``http/1.1`` (the gateway does not speak h2); tcp mode offers the configured
``alpn`` list.

:func:`server_context_for` caches contexts per configuration and rebuilds one when a
certificate or key file changes on disk (checked at most once a second), so renewed
certificates are picked up without a reload; a rebuild that fails (a half-written renewal)
keeps the previous context and logs the error.

Client side (:func:`build_client_context`): verification on by default against the system
store or ``ca``, host name checked against ``server_name`` (else the node's IP address),
TLS 1.2 minimum, ALPN ``http/1.1``.
"""

from __future__ import annotations

import datetime
import os
import ssl
import time
from collections.abc import Iterable

import attrs
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .config import ListenerTLSConfig, TLSCertificateConfig, UpstreamTLSConfig

__all__ = [
    "build_client_context",
    "build_server_context",
    "certificate_expiry",
    "certificate_names",
    "check_certificates",
    "client_context_for",
    "server_context_for",
]

log = structlog.get_logger("l4gw.tls")

#: Mozilla "intermediate" TLS 1.2 suites (TLS 1.3 suites are OpenSSL's defaults).
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: How often :func:`server_context_for` looks at the files' modification times.
RECHECK_INTERVAL = 1.0


# -- certificate inspection ------------------------------------------------------------------


def _load_certificates(path: str) -> list[x509.Certificate]:
    with open(path, "rb") as file:
        data = file.read()
    certificates = x509.load_pem_x509_certificates(data)
    if not certificates:
        raise ValueError("no PEM certificate in the file")
    return certificates


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for: its subjectAltName DNS entries, else its CN."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        names = [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    else:
        names = [str(name) for name in san.value.get_values_for_type(x509.DNSName)]
    return [name.lower().rstrip(".") for name in names]


def check_certificates(
    cfg: ListenerTLSConfig, *, now: datetime.datetime | None = None
) -> list[str]:
    """Problems with the configured certificate files; each message names the file.

    Checks that each file is readable PEM, the key is unencrypted and belongs to the
    certificate, and the certificate is valid now (not expired, not yet valid).
    """
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    problems: list[str] = []
    for pair in cfg.certificates:
        problems.extend(_check_pair(pair, now))
    return problems


def _check_pair(pair: TLSCertificateConfig, now: datetime.datetime) -> list[str]:
    problems: list[str] = []
    certificate: x509.Certificate | None = None
    try:
        certificate = _load_certificates(pair.cert)[0]
    except OSError as exc:
        problems.append(f"{pair.cert}: cannot read the certificate ({exc.strerror or exc})")
    except ValueError as exc:
        problems.append(f"{pair.cert}: not a PEM certificate ({exc})")
    key = None
    try:
        with open(pair.key, "rb") as file:
            key_data = file.read()
    except OSError as exc:
        problems.append(f"{pair.key}: cannot read the private key ({exc.strerror or exc})")
    else:
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except TypeError:
            problems.append(f"{pair.key}: the private key is encrypted (give an unencrypted key)")
        except (ValueError, x509.UnsupportedGeneralNameType) as exc:
            problems.append(f"{pair.key}: not a PEM private key ({exc})")
    if certificate is None:
        return problems
    if key is not None:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, spki) != certificate.public_key().public_bytes(
            der, spki
        ):
            problems.append(
                f"{pair.key}: the private key does not match the certificate {pair.cert}"
            )
    not_after = certificate.not_valid_after_utc
    not_before = certificate.not_valid_before_utc
    if not_after < now:
        problems.append(
            f"{pair.cert}: the certificate expired on {not_after:%Y-%m-%d %H:%M:%S} UTC"
        )
    if not_before > now:
        problems.append(
            f"{pair.cert}: the certificate is not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC"
        )
    return problems


def certificate_expiry(cfg: ListenerTLSConfig) -> list[tuple[str, float]]:
    """``(certificate file, notAfter as a Unix time)`` for each readable certificate."""
    result: list[tuple[str, float]] = []
    for pair in cfg.certificates:
        try:
            certificate = _load_certificates(pair.cert)[0]
        except (OSError, ValueError):
            continue
        result.append((pair.cert, certificate.not_valid_after_utc.timestamp()))
    return result


# -- server contexts -------------------------------------------------------------------------


def _base_server_context(cfg: ListenerTLSConfig, http: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(TLS12_CIPHERS)
    if http:
        ctx.set_alpn_protocols(["http/1.1"])
    elif cfg.alpn:
        ctx.set_alpn_protocols(list(cfg.alpn))
    return ctx


@attrs.define
class _SNIIndex:
    exact: dict[str, ssl.SSLContext] = attrs.field(factory=dict)
    wildcard: dict[str, ssl.SSLContext] = attrs.field(factory=dict)

    def add(self, names: Iterable[str], ctx: ssl.SSLContext) -> None:
        for name in names:
            if name.startswith("*."):
                self.wildcard.setdefault(name[2:], ctx)
            else:
                self.exact.setdefault(name, ctx)

    def lookup(self, server_name: str) -> ssl.SSLContext | None:
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is None:
            _, dot, parent = name.partition(".")
            if dot:
                ctx = self.wildcard.get(parent)
        return ctx


def build_server_context(cfg: ListenerTLSConfig, *, http: bool) -> ssl.SSLContext:
    """The listener's server context (see the module docstring for SNI and settings).

    Raises ``OSError`` for unreadable files, ``ssl.SSLError`` for a bad or mismatched
    certificate and key, ``ValueError`` when no certificate is configured.
    """
    if not cfg.certificates:
        raise ValueError("no certificates configured")
    contexts: list[ssl.SSLContext] = []
    index = _SNIIndex()
    for pair in cfg.certificates:
        ctx = _base_server_context(cfg, http)
        ctx.load_cert_chain(pair.cert, pair.key)
        contexts.append(ctx)
        try:
            names = certificate_names(_load_certificates(pair.cert)[0])
        except ValueError:
            names = []
        index.add(names, ctx)
    default = contexts[0]
    if len(contexts) > 1:

        def sni_callback(
            sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
        ) -> None:
            if server_name:
                chosen = index.lookup(server_name)
                if chosen is not None and chosen is not default:
                    sock.context = chosen

        default.sni_callback = sni_callback
    return default


@attrs.define
class _Cached:
    ctx: ssl.SSLContext
    stamp: tuple[tuple[int, int], ...]
    checked: float


_SERVER_CACHE: dict[tuple[ListenerTLSConfig, bool], _Cached] = {}


def _stamp(cfg: ListenerTLSConfig) -> tuple[tuple[int, int], ...]:
    stamp: list[tuple[int, int]] = []
    for pair in cfg.certificates:
        for path in (pair.cert, pair.key):
            try:
                st = os.stat(path)
            except OSError:
                stamp.append((-1, -1))
            else:
                stamp.append((st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def server_context_for(cfg: ListenerTLSConfig, *, http: bool) -> ssl.SSLContext:
    """A cached :func:`build_server_context`, rebuilt when the files change on disk.

    Raises like :func:`build_server_context` only when there is no previous context to keep.
    """
    key = (cfg, http)
    entry = _SERVER_CACHE.get(key)
    now = time.monotonic()
    if entry is not None and now - entry.checked < RECHECK_INTERVAL:
        return entry.ctx
    stamp = _stamp(cfg)
    if entry is not None and stamp == entry.stamp:
        entry.checked = now
        return entry.ctx
    try:
        ctx = build_server_context(cfg, http=http)
    except (OSError, ssl.SSLError, ValueError) as exc:
        if entry is None:
            raise
        entry.checked = now
        log.error(
            "tls_reload_failed",
            certificates=[pair.cert for pair in cfg.certificates],
            error=str(exc),
        )
        return entry.ctx
    if entry is not None:
        log.info("tls_reloaded", certificates=[pair.cert for pair in cfg.certificates])
    if len(_SERVER_CACHE) > 256:
        _SERVER_CACHE.clear()
    _SERVER_CACHE[key] = _Cached(ctx, stamp, now)
    return ctx


# -- client contexts -------------------------------------------------------------------------


def build_client_context(cfg: UpstreamTLSConfig) -> ssl.SSLContext:
    """A context for connections to nodes: verification on unless ``verify = false``.

    ``ca`` replaces the system trust store. Raises ``OSError``/``ssl.SSLError`` for a bad
    CA file.
    """
    if cfg.verify:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


_CLIENT_CACHE: dict[UpstreamTLSConfig, ssl.SSLContext] = {}


def client_context_for(cfg: UpstreamTLSConfig) -> ssl.SSLContext:
    """A cached :func:`build_client_context` (one per configuration value)."""
    ctx = _CLIENT_CACHE.get(cfg)
    if ctx is None:
        ctx = build_client_context(cfg)
        if len(_CLIENT_CACHE) > 256:
            _CLIENT_CACHE.clear()
        _CLIENT_CACHE[cfg] = ctx
    return ctx
