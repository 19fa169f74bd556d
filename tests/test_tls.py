"""TLS (l4gw.tls): SNI certificate choice, settings, certificate checks, client contexts, and
TLS termination in front of the http proxy (curl, openssl s_client)."""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from l4gw.core import tls
from l4gw.core.config import ListenerTLSConfig, TLSCertificateConfig, UpstreamTLSConfig

from .test_http_proxy import Node, start_gateway, upstream_runtime


class Certs:
    """A test CA and certificate files in a directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_path = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def issue(self, name: str, *identities: str, **options: Any) -> TLSCertificateConfig:
        leaf = self.ca.issue_cert(*identities, **options)
        cert = self.dir / f"{name}.pem"
        key = self.dir / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return TLSCertificateConfig(cert=str(cert), key=str(key))

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        ctx.check_hostname = check_hostname
        return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def listener_tls(*pairs: TLSCertificateConfig, **options: Any) -> ListenerTLSConfig:
    return ListenerTLSConfig(certificates=tuple(pairs), **options)


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str | None
) -> trio.SSLStream[trio.abc.Stream]:
    """A TLS handshake over an in-memory stream pair; the client side is returned."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    client: trio.SSLStream[trio.abc.Stream] = trio.SSLStream(
        client_raw, client_ctx, server_hostname=server_name
    )
    error: trio.BrokenResourceError | None = None

    async def serve() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(server)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            await client.do_handshake()
        except trio.BrokenResourceError as exc:  # raised below, not in an ExceptionGroup
            error = exc
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return client


def peer_names(stream: trio.SSLStream[trio.abc.Stream]) -> list[str]:
    cert = stream.getpeercert()
    assert cert is not None
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


# --- server contexts and SNI ---------------------------------------------------------------


async def test_sni_picks_the_matching_certificate(certs: Certs) -> None:
    cfg = listener_tls(
        certs.issue("default", "default.test"),
        certs.issue("api", "api.test", "api2.test"),
        certs.issue("wild", "*.wild.test"),
    )
    ctx = tls.build_server_context(cfg, http=True)
    with trio.fail_after(10):
        for name, expected in [
            ("api.test", ["api.test", "api2.test"]),
            ("API2.test", ["api.test", "api2.test"]),
            ("x.wild.test", ["*.wild.test"]),
            ("default.test", ["default.test"]),
        ]:
            client = await handshake(ctx, certs.client_context(), name)
            assert peer_names(client) == expected
            assert client.selected_alpn_protocol() is None  # the client offered none
        # No match (one wildcard label only) or no SNI at all: the first certificate.
        for other in ("a.b.wild.test", "unknown.test", None):
            client = await handshake(ctx, certs.client_context(check_hostname=False), other)
            assert peer_names(client) == ["default.test"]


async def test_alpn_and_min_version(certs: Certs) -> None:
    pair = certs.issue("a", "a.test")
    with trio.fail_after(10):
        http_ctx = tls.build_server_context(listener_tls(pair, alpn=("h2", "http/1.1")), http=True)
        client_ctx = certs.client_context()
        client_ctx.set_alpn_protocols(["h2", "http/1.1"])
        client = await handshake(http_ctx, client_ctx, "a.test")
        assert client.selected_alpn_protocol() == "http/1.1"  # never h2 in http mode
        tcp_ctx = tls.build_server_context(listener_tls(pair, alpn=("h2", "http/1.1")), http=False)
        client = await handshake(tcp_ctx, client_ctx, "a.test")
        assert client.selected_alpn_protocol() == "h2"  # tcp mode offers the configured list

        strict = tls.build_server_context(listener_tls(pair, min_version="1.3"), http=True)
        old_client = certs.client_context()
        old_client.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(trio.BrokenResourceError):
            await handshake(strict, old_client, "a.test")
        client = await handshake(strict, certs.client_context(), "a.test")
        assert client.version() == "TLSv1.3"


def test_build_server_context_errors(certs: Certs, tmp_path: Path) -> None:
    good = certs.issue("a", "a.test")
    other = certs.issue("b", "b.test")
    with pytest.raises(OSError):
        tls.build_server_context(
            listener_tls(TLSCertificateConfig(cert=str(tmp_path / "nope.pem"), key=good.key)),
            http=True,
        )
    with pytest.raises(ssl.SSLError):
        tls.build_server_context(
            listener_tls(TLSCertificateConfig(cert=good.cert, key=other.key)), http=True
        )
    with pytest.raises(ValueError):
        tls.build_server_context(listener_tls(), http=True)


# --- certificate checks --------------------------------------------------------------------


def test_check_certificates(certs: Certs, tmp_path: Path) -> None:
    good = certs.issue("good", "good.test")
    assert tls.check_certificates(listener_tls(good)) == []

    now = datetime.datetime.now(datetime.UTC)
    expired = certs.issue(
        "expired",
        "old.test",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    future = certs.issue("future", "new.test", not_before=now + datetime.timedelta(days=1))
    mismatch = TLSCertificateConfig(cert=good.cert, key=expired.key)
    missing = TLSCertificateConfig(cert=str(tmp_path / "missing.pem"), key=good.key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    not_pem = TLSCertificateConfig(cert=str(garbage), key=str(garbage))
    encrypted_key = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(Path(good.key).read_bytes(), password=None)
    encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    encrypted = TLSCertificateConfig(cert=good.cert, key=str(encrypted_key))

    problems = tls.check_certificates(
        listener_tls(expired, future, mismatch, missing, not_pem, encrypted)
    )
    text = "\n".join(problems)
    assert f"{expired.cert}: the certificate expired on" in text
    assert f"{future.cert}: the certificate is not valid before" in text
    assert f"{expired.key}: the private key does not match the certificate {good.cert}" in text
    assert f"{missing.cert}: cannot read the certificate" in text
    assert f"{garbage}: not a PEM certificate" in text
    assert f"{garbage}: not a PEM private key" in text
    assert f"{encrypted_key}: the private key is encrypted" in text
    assert len(problems) == 7


def test_certificate_expiry(certs: Certs, tmp_path: Path) -> None:
    not_after = datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    pair = certs.issue("a", "a.test", not_after=not_after)
    missing = TLSCertificateConfig(cert=str(tmp_path / "missing.pem"), key=pair.key)
    assert tls.certificate_expiry(listener_tls(pair, missing)) == [
        (pair.cert, not_after.timestamp())
    ]


def test_certificate_names_falls_back_to_the_common_name(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Legacy.Example.")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert tls.certificate_names(cert) == ["legacy.example"]


# --- caching and reloading -------------------------------------------------------------------


def test_server_context_for_reloads_changed_files(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = certs.issue("a", "a.test")
    cfg = listener_tls(pair)
    first = tls.server_context_for(cfg, http=True)
    assert tls.server_context_for(cfg, http=True) is first
    monkeypatch.setattr(tls, "RECHECK_INTERVAL", 0.0)
    assert tls.server_context_for(cfg, http=True) is first  # files unchanged
    renewed = certs.issue("renewed", "a.test")
    Path(pair.cert).write_bytes(Path(renewed.cert).read_bytes())
    Path(pair.key).write_bytes(Path(renewed.key).read_bytes())
    stat = os.stat(pair.cert)
    os.utime(pair.cert, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    second = tls.server_context_for(cfg, http=True)
    assert second is not first
    # A half-written renewal (key not matching yet) keeps the previous context.
    Path(pair.key).write_bytes(Path(certs.issue("other", "x.test").key).read_bytes())
    assert tls.server_context_for(cfg, http=True) is second


# --- client contexts -------------------------------------------------------------------------


async def test_client_contexts(certs: Certs) -> None:
    pair = certs.issue("node", "node.internal")
    server_ctx = tls.build_server_context(listener_tls(pair), http=True)
    with trio.fail_after(10):
        verified = tls.build_client_context(UpstreamTLSConfig(ca=str(certs.ca_path)))
        client = await handshake(server_ctx, verified, "node.internal")
        assert client.selected_alpn_protocol() == "http/1.1"
        with pytest.raises(trio.BrokenResourceError):
            await handshake(server_ctx, verified, "other.internal")
        system_store = tls.build_client_context(UpstreamTLSConfig())
        with pytest.raises(trio.BrokenResourceError):
            await handshake(server_ctx, system_store, "node.internal")  # unknown CA
        insecure = tls.build_client_context(UpstreamTLSConfig(verify=False))
        await handshake(server_ctx, insecure, "anything")
    assert tls.client_context_for(UpstreamTLSConfig(verify=False)) is tls.client_context_for(
        UpstreamTLSConfig(verify=False)
    )


# --- TLS in front of the http proxy ----------------------------------------------------------


async def test_https_listener_with_curl_and_openssl(certs: Certs, tmp_path: Path) -> None:
    cfg = listener_tls(certs.issue("a", "a.test"), certs.issue("b", "b.test"))
    ctx = tls.server_context_for(cfg, http=True)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            node = await Node().start(nursery)
            gateway = await start_gateway(
                nursery, {"web": upstream_runtime("web", [node.address])}, tls_context=ctx
            )
            port = gateway.port
            proc = await trio.run_process(
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "20",
                    "--cacert",
                    str(certs.ca_path),
                    "--resolve",
                    f"b.test:{port}:127.0.0.1",
                    f"https://b.test:{port}/x",
                    f"https://b.test:{port}/y",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.count(b'"x-forwarded-proto", "https"') == 2
            assert node.connections == 1

            proc = await trio.run_process(
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-servername",
                    "b.test",
                    "-alpn",
                    "h2,http/1.1",
                    "-CAfile",
                    str(certs.ca_path),
                    "-verify_return_error",
                ],
                stdin=b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            out = proc.stdout.decode()
            assert "ALPN protocol: http/1.1" in out, out
            assert "Verify return code: 0 (ok)" in out
            pem = out[
                out.index("-----BEGIN CERTIFICATE-----") : out.index("-----END CERTIFICATE-----")
                + len("-----END CERTIFICATE-----")
            ]
            served = x509.load_pem_x509_certificate(pem.encode())
            assert tls.certificate_names(served) == ["b.test"]
            nursery.cancel_scope.cancel()
