"""End-to-end, the seed scenario: an API gateway exposes ``/``, ``/header`` and
``/foo/{proxy+}`` over TLS and forwards them to an app behind nginx whose virtual host answers
only when the Host header is the backend's own name. Real daemon, real nginx, curl and
``openssl s_client`` as clients."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID

from .conftest import DaemonFactory, free_port, require_program

pytestmark = pytest.mark.e2e

BACKEND_HOST = "backend.internal"
API_HOST = "api.example.com"
WWW_HOST = "www.example.com"
#: What nginx answers on /header: the forwarding headers it received.
HEADER_ECHO = (
    "xff=$http_x_forwarded_for proto=$http_x_forwarded_proto "
    "xfh=$http_x_forwarded_host host=$host\\n"
)


@pytest.fixture
def nginx_app(tmp_path: Path) -> Iterator[int]:
    """nginx with a catch-all server (421) and the app's vhost ``backend.internal``."""
    nginx = require_program("nginx")
    port = free_port()
    root = tmp_path / "nginx"
    root.mkdir()
    conf = root / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{port} default_server;
    return 421 "no such virtual host: $host\\n";
  }}
  server {{
    listen 127.0.0.1:{port};
    server_name {BACKEND_HOST};
    location = / {{ return 200 "root host=$host uri=$request_uri\\n"; }}
    location = /header {{
      return 200 "{HEADER_ECHO}";
    }}
    location /foo/ {{ return 200 "foo host=$host uri=$request_uri\\n"; }}
  }}
}}
"""
    )
    proc = subprocess.Popen([nginx, "-p", str(root), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        yield port
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    out = {"ca": tmp_path / "ca.pem"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    for name in (API_HOST, WWW_HOST):
        issued = ca.issue_cert(name)
        out[f"{name}.pem"] = tmp_path / f"{name}.pem"
        out[f"{name}.key"] = tmp_path / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(out[f"{name}.pem"]))
        issued.private_key_pem.write_to_path(str(out[f"{name}.key"]))
    return out


def gateway_config(port: int, backend: int, certs: dict[str, Path]) -> str:
    return f"""
[daemon]
admin = "{{admin}}"
log_format = "json"

[upstreams.app]
nodes = [{{ address = "127.0.0.1:{backend}", weight = 1 }}]
host_header = "{BACKEND_HOST}"

[[listeners]]
name = "api"
listen = "127.0.0.1:{port}"
mode = "http"

[listeners.tls]
certificates = [
  {{ cert = "{certs[f"{API_HOST}.pem"]}", key = "{certs[f"{API_HOST}.key"]}" }},
  {{ cert = "{certs[f"{WWW_HOST}.pem"]}", key = "{certs[f"{WWW_HOST}.key"]}" }},
]
min_version = "1.2"

[[listeners.routes]]
path = "/"
upstream = "app"

[[listeners.routes]]
path = "/header"
upstream = "app"

[[listeners.routes]]
path = "/foo/{{proxy+}}"
upstream = "app"
rewrite = "/foo/{{proxy}}"
"""


def curl(port: int, path: str, ca: Path, host: str = API_HOST) -> tuple[int, str]:
    result = subprocess.run(
        [
            require_program("curl"),
            "-sS",
            "--cacert",
            str(ca),
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            f"https://{host}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body


async def test_seed_scenario_over_tls(
    l4gw_daemon: DaemonFactory, nginx_app: int, certs: dict[str, Path]
) -> None:
    with trio.fail_after(60):
        port = free_port()
        daemon = await l4gw_daemon(gateway_config(port, nginx_app, certs))

        def check() -> None:
            assert curl(port, "/", certs["ca"]) == (200, f"root host={BACKEND_HOST} uri=/\n")
            code, body = curl(port, "/header", certs["ca"])
            assert code == 200
            assert body == (
                f"xff=127.0.0.1 proto=https xfh={API_HOST}:{port} host={BACKEND_HOST}\n"
            )
            assert curl(port, "/foo/bar/baz?x=1&y=2", certs["ca"]) == (
                200,
                f"foo host={BACKEND_HOST} uri=/foo/bar/baz?x=1&y=2\n",
            )
            code, body = curl(port, "/nope", certs["ca"])
            assert code == 404 and '"status": 404' in body
            code, body = curl(port, "/foo", certs["ca"])  # {proxy+} needs a segment
            assert code == 404

        await trio.to_thread.run_sync(check)
        lines = await daemon.wait_log("request", count=5)
        foo = next(line for line in lines if line["path"].startswith("/foo/bar"))
        assert foo["upstream_path"] == "/foo/bar/baz?x=1&y=2"
        assert foo["host"] == f"{API_HOST}:{port}"
        assert foo["status"] == 200
        assert (
            await daemon.metric(
                "l4gw_http_requests_total", listener="api", route="/foo/{proxy+}", status="200"
            )
            == 1
        )


async def test_without_host_rewrite_the_vhost_refuses(
    l4gw_daemon: DaemonFactory, nginx_app: int, certs: dict[str, Path]
) -> None:
    """The reason for host_header: nginx answers only its own name."""
    with trio.fail_after(60):
        port = free_port()
        text = gateway_config(port, nginx_app, certs).replace(f'host_header = "{BACKEND_HOST}"', "")
        await l4gw_daemon(text)
        code, body = await trio.to_thread.run_sync(curl, port, "/", certs["ca"])
        assert code == 421
        assert body == f"no such virtual host: {API_HOST}\n"


def unit_of(pem: Path) -> str:
    """The subject OU that tells trustme certificates apart ("Testing cert #...")."""
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    (attribute,) = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(attribute.value)


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_program("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )


async def test_sni_and_protocol_versions(
    l4gw_daemon: DaemonFactory, nginx_app: int, certs: dict[str, Path]
) -> None:
    with trio.fail_after(60):
        port = free_port()
        await l4gw_daemon(gateway_config(port, nginx_app, certs))
        www = await trio.to_thread.run_sync(s_client, port, "-servername", WWW_HOST)
        assert unit_of(certs[f"{WWW_HOST}.pem"]) in www.stdout
        assert unit_of(certs[f"{API_HOST}.pem"]) not in www.stdout
        # No SNI: the first certificate is the default.
        default = await trio.to_thread.run_sync(s_client, port, "-noservername")
        assert unit_of(certs[f"{API_HOST}.pem"]) in default.stdout
        alpn = await trio.to_thread.run_sync(
            s_client, port, "-servername", API_HOST, "-alpn", "h2,http/1.1"
        )
        assert "ALPN protocol: http/1.1" in alpn.stdout
        old = await trio.to_thread.run_sync(s_client, port, "-servername", API_HOST, "-tls1_1")
        assert old.returncode != 0  # min_version = "1.2"
        tls13 = await trio.to_thread.run_sync(s_client, port, "-servername", API_HOST, "-tls1_3")
        assert "TLSv1.3" in tls13.stdout


async def test_denied_source_gets_403(
    l4gw_daemon: DaemonFactory, nginx_app: int, certs: dict[str, Path]
) -> None:
    """In http mode a refused source gets the SPEC's 403 with the JSON body (tcp mode closes)."""
    with trio.fail_after(60):
        port = free_port()
        text = gateway_config(port, nginx_app, certs).replace(
            'mode = "http"', 'mode = "http"\ndeny = ["127.0.0.1/32"]'
        )
        daemon = await l4gw_daemon(text)
        code, body = await trio.to_thread.run_sync(curl, port, "/", certs["ca"])
        assert code == 403
        assert json.loads(body) == {"error": "source address not allowed", "status": 403}
        (line,) = await daemon.wait_log("request")
        assert line["status"] == 403
        while not await daemon.metric("l4gw_connections_total", listener="api", outcome="denied"):
            await trio.sleep(0.02)
