"""Framing and request smuggling, end to end: a corpus of hostile client byte streams sent
through the real daemon (one plain http listener and one TLS-terminating listener) to a node
run by the test, plus hypothesis mutations of that corpus.

The corpus (``tests/data/framing_corpus.toml``) gives, for each raw client byte stream, the
statuses the client must get and the requests the node must see. Whatever the case, one
invariant must hold on every connection: the requests l4gw accounted for (its
``event="request"`` access lines answered by the node) are exactly the requests the node
parsed, one to one and in order, and every response reaches the client of the request it
answers, in order. A request that reaches the node without an access line is a smuggled one
(a desync between l4gw's framing and the node's).

The node parses with :class:`StrictParser`, written here rather than h11: l4gw itself parses
clients with h11, so an h11 node would share h11's leniencies (bare LF line ends, control
characters in field values, chunk-size whitespace) and could not notice l4gw passing one of
them on. The strict parser takes only what RFC 9112 allows and l4gw is expected to send
(re-framed bodies: one ``Content-Length`` of digits that fits 63 bits, or ``chunked``
without extensions or trailers); anything else is recorded as a violation, which fails the
test: l4gw sent the node something a careful parser refuses or may read differently.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import ssl
import tomllib
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import DaemonFactory, RunningDaemon, free_port

pytestmark = pytest.mark.e2e

CORPUS = Path(__file__).parent / "data" / "framing_corpus.toml"
TLS_NAME = "framing.example"
#: How long one connection may take before it counts as a hang.
CONNECTION_DEADLINE = 15.0
#: Pause between two writes of a split byte stream (so that they arrive as separate reads).
PIECE_PAUSE = 0.005

# -- the corpus -------------------------------------------------------------------------------

_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rntvf0\\F])")
_SIMPLE = {"r": "\r", "n": "\n", "t": "\t", "v": "\v", "f": "\f", "0": "\0", "\\": "\\"}


def decode(text: str, fill: str = "") -> bytes:
    """The bytes written in a corpus string: ``\\r \\n \\t \\v \\f \\0 \\\\``, ``\\xHH``,
    and ``\\F`` for the case's ``fill`` (a long run of bytes). Other characters are
    latin-1."""

    def one(match: re.Match[str]) -> str:
        code = match[1]
        if code[0] == "x":
            return chr(int(code[1:], 16))
        if code == "F":
            return fill
        return _SIMPLE[code]

    return _ESCAPE.sub(one, text).encode("latin-1")


@attrs.frozen
class Expected:
    """A request as the node must parse it."""

    method: bytes
    target: bytes
    body: bytes
    #: The Content-Length the node must see (None: not checked).
    length: bytes | None


@attrs.frozen
class Case:
    name: str
    cls: str
    #: The byte stream, as the writes that send it.
    pieces: tuple[bytes, ...]
    #: The statuses the client must get, in order.
    statuses: tuple[int, ...]
    #: The requests the node must parse, in order.
    node: tuple[Expected, ...]

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


def load_corpus(path: Path = CORPUS) -> list[Case]:
    raw = tomllib.loads(path.read_text())
    cases = []
    for item in raw["case"]:
        fill = item.get("fill", {})
        fill_text = decode(fill.get("text", "")).decode("latin-1") * fill.get("count", 0)
        pieces = [decode(piece, fill_text) for piece in item["send"]]
        every = item.get("split", 0)
        if every:  # one write per `split` bytes
            data = b"".join(pieces)
            pieces = [data[i : i + every] for i in range(0, len(data), every)]
        cases.append(
            Case(
                name=item["name"],
                cls=item["class"],
                pieces=tuple(pieces),
                statuses=tuple(item["status"]),
                node=tuple(
                    Expected(
                        method=decode(request["method"]),
                        target=decode(request["target"]),
                        body=decode(request.get("body", "")),
                        length=decode(request["length"]) if "length" in request else None,
                    )
                    for request in item.get("node", [])
                ),
            )
        )
    return cases


def test_corpus_is_well_formed() -> None:
    """Names are unique, every case has a known class, and the file covers what it claims."""
    cases = load_corpus()
    names = [case.name for case in cases]
    assert len(names) == len(set(names))
    assert len(cases) >= 60
    classes = {case.cls for case in cases}
    assert {"CL.TE", "TE.CL", "TE.TE", "CL.CL", "chunk", "obs-fold", "control", "431"} <= classes
    for case in cases:
        assert case.data, case.name
        assert all(piece for piece in case.pieces), case.name
    assert decode(r"a\r\n\t\v\f\0\\\x7f") == b"a\r\n\t\v\f\x00\\\x7f"


# -- the node ---------------------------------------------------------------------------------


class Violation(Exception):
    """The node got bytes a strict HTTP/1.1 parser refuses."""


_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1")
_FIELD = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?)[ \t]*"
)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_DIGITS = re.compile(rb"[0-9]+")
NODE_MAX_HEAD = 64 * 1024


@attrs.define
class NodeRequest:
    number: int
    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name]
        return b",".join(values) if values else None


class StrictParser:
    """The node's request parser: RFC 9112 with no leniency (sans I/O).

    Lines end with CRLF; no obs-fold, no control characters; exactly one Host; framing by a
    single all-digit ``Content-Length`` (below 2**63) or ``Transfer-Encoding: chunked``,
    never both; chunks with a plain hex size, no extensions, no trailers (l4gw re-frames
    bodies, so it never has a reason to send any of those)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        #: (method, target, headers) of the request whose body is being read.
        self.head: tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None = None
        self.length = 0  # Content-Length framing: bytes still due
        self.chunked = False
        self.chunk_left = -1  # -1: a chunk-size line is due
        self.body = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]]:
        """Complete requests in the bytes so far; raises :class:`Violation`."""
        self.buffer += data
        done: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
        while True:
            request = self._next()
            if request is None:
                return done
            done.append(request)

    def _next(self) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes] | None:
        buffer = self.buffer
        if self.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > NODE_MAX_HEAD:
                    raise Violation("head too large")
                return None
            head = bytes(buffer[: end + 2])
            del buffer[: end + 4]
            self._start(head)
        assert self.head is not None
        if self.chunked:
            if not self._chunks():
                return None
        else:
            take = min(self.length, len(buffer))
            self.body += buffer[:take]
            del buffer[:take]
            self.length -= take
            if self.length:
                return None
        method, target, headers = self.head
        body = bytes(self.body)
        self.head = None
        self.body = bytearray()
        self.chunked = False
        self.chunk_left = -1
        return method, target, headers, body

    def _start(self, head: bytes) -> None:
        if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", head.replace(b"\r\n", b"")):
            raise Violation(f"control character (or bare CR/LF) in the head {head!r}")
        lines = head.split(b"\r\n")[:-1]
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise Violation(f"request line {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            field = _FIELD.fullmatch(line)
            if field is None:
                raise Violation(f"header line {line!r}")
            headers.append((field[1].lower(), field[2]))
        names = [name for name, _ in headers]
        if names.count(b"host") != 1:
            raise Violation(f"{names.count(b'host')} Host headers")
        lengths = [value for name, value in headers if name == b"content-length"]
        codings = [value for name, value in headers if name == b"transfer-encoding"]
        if len(lengths) > 1 or (
            lengths and (_DIGITS.fullmatch(lengths[0]) is None or int(lengths[0]) >= 1 << 63)
        ):
            raise Violation(f"Content-Length {lengths!r}")
        if codings not in ([], [b"chunked"]):
            raise Violation(f"Transfer-Encoding {codings!r}")
        if lengths and codings:
            raise Violation("both Content-Length and Transfer-Encoding")
        self.head = (match[1], match[2], headers)
        self.chunked = bool(codings)
        self.length = int(lengths[0]) if lengths else 0

    def _chunks(self) -> bool:
        """Read chunks; True once the last chunk and the empty trailer section are in."""
        buffer = self.buffer
        while True:
            if self.chunk_left < 0:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 64:
                        raise Violation(f"chunk-size line {bytes(buffer[:64])!r}")
                    return False
                line = bytes(buffer[:end])
                if _CHUNK_SIZE.fullmatch(line) is None:
                    raise Violation(f"chunk-size line {line!r}")
                size = int(line, 16)
                if size == 0:
                    if len(buffer) < end + 4:
                        return False
                    if buffer[end : end + 4] != b"\r\n\r\n":
                        raise Violation("trailer fields, or no CRLF after the last chunk")
                    del buffer[: end + 4]
                    return True
                del buffer[: end + 2]
                self.chunk_left = size
            if len(buffer) < self.chunk_left + 2:
                return False
            if buffer[self.chunk_left : self.chunk_left + 2] != b"\r\n":
                raise Violation("no CRLF after chunk data")
            self.body += buffer[: self.chunk_left]
            del buffer[: self.chunk_left + 2]
            self.chunk_left = -1


class Node:
    """A loopback HTTP/1.1 node: parses with :class:`StrictParser`, records each request and
    answers it with a 200 naming its number; a violation is recorded and the connection
    closed."""

    def __init__(self) -> None:
        self.requests: list[NodeRequest] = []
        self.violations: list[str] = []
        self.connections = 0
        self.port = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        connection = self.connections
        parser = StrictParser()
        try:
            while data := await stream.receive_some(65536):
                try:
                    requests = parser.feed(data)
                except Violation as exc:
                    self.violations.append(str(exc))
                    return
                out = []
                for method, target, headers, body in requests:
                    number = len(self.requests) + 1
                    self.requests.append(
                        NodeRequest(number, connection, method, target, headers, body)
                    )
                    text = b"node %d %s %s" % (number, method, target)
                    out.append(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Node-Request: %d\r\n\r\n%s"
                        % (len(text), number, text)
                    )
                if out:
                    await stream.send_all(b"".join(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


# -- the client -------------------------------------------------------------------------------


@attrs.frozen
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def parse_responses(data: bytes) -> tuple[list[Response], bytes]:
    """The responses in what the client received, and any bytes that are not one."""
    responses: list[Response] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = data[:end].split(b"\r\n")
        match = re.fullmatch(rb"HTTP/1\.[01] ([0-9]{3}) .*", lines[0])
        if match is None:
            break
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        status = int(match[1])
        rest = data[end + 4 :]
        if 100 <= status < 200:
            body = b""
        elif b"content-length" in headers:
            size = int(headers[b"content-length"])
            if len(rest) < size:
                break
            body, rest = rest[:size], rest[size:]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body_parts = []
            while True:
                size_end = rest.find(b"\r\n")
                if size_end < 0:
                    return responses, data
                size = int(rest[:size_end].split(b";")[0], 16)
                chunk = rest[size_end + 2 : size_end + 2 + size]
                rest = rest[size_end + 4 + size :]
                if size == 0:
                    break
                body_parts.append(chunk)
            body = b"".join(body_parts)
        else:
            body, rest = rest, b""
        responses.append(Response(status, headers, body))
        data = rest
    return responses, data


class TLSClient:
    """A TLS client over a raw socket (``ssl`` memory BIOs), so that it can half-close at the
    TCP level after its last write and go on reading, as a plain client does."""

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname=TLS_NAME)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        while data:
            sent = await self.sock.send(data)
            data = data[sent:]

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.sock.recv(65536)
                if not data:
                    raise ConnectionError("EOF during the TLS handshake") from None
                self.incoming.write(data)
                continue
            await self._flush()
            return

    async def send(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()

    async def receive(self) -> bytes:
        """Decrypted bytes; b"" at EOF (close_notify or TCP EOF)."""
        while True:
            try:
                return self.obj.read(65536)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            data = await self.sock.recv(65536)
            if not data:
                self.incoming.write_eof()
            else:
                self.incoming.write(data)


@attrs.frozen
class Outcome:
    """What one connection gave: the client's bytes, and whether it ended in time."""

    received: bytes
    ended: str  # "eof", "reset" or "hang"
    port: int


async def run_connection(
    port: int, pieces: tuple[bytes, ...], context: ssl.SSLContext | None
) -> Outcome:
    """Send ``pieces`` (one write each) on a fresh connection, half-close, and read until the
    gateway closes (or ``CONNECTION_DEADLINE``)."""
    sock = trio.socket.socket()
    received = bytearray()
    ended = "hang"
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect(("127.0.0.1", port))
        local_port = sock.getsockname()[1]
        tls = TLSClient(sock, context) if context is not None else None
        with trio.move_on_after(CONNECTION_DEADLINE):
            try:
                if tls is not None:
                    await tls.handshake()
                for i, piece in enumerate(pieces):
                    if i:
                        await trio.sleep(PIECE_PAUSE)
                    if tls is not None:
                        await tls.send(piece)
                    else:
                        view = memoryview(piece)
                        while view:
                            view = view[await sock.send(view) :]
                sock.shutdown(socket.SHUT_WR)
                while True:
                    data = await (tls.receive() if tls is not None else sock.recv(65536))
                    if not data:
                        ended = "eof"
                        break
                    received += data
            except (OSError, ssl.SSLError):
                # A reset (the gateway closed with bytes of ours unread, e.g. sent after a
                # request that closes the connection), or no connection left to half-close.
                ended = "reset"
    return Outcome(bytes(received), ended, local_port)


# -- the daemon and the checks ----------------------------------------------------------------


class LogReader:
    """The daemon's JSON log lines, read incrementally."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self.path = daemon.log_path
        self.offset = 0
        self.lines: list[dict[str, Any]] = []
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        text = self.partial + data
        *complete, self.partial = text.split(b"\n")
        for line in complete:
            try:
                item = json.loads(line)
            except ValueError:
                item = {"event": "unparsed", "text": line.decode(errors="replace")}
            self.lines.append(item)
        return self.lines

    def requests_from(self, port: int) -> list[dict[str, Any]]:
        client = f"127.0.0.1:{port}"
        return [e for e in self.read() if e.get("event") == "request" and e.get("client") == client]


@attrs.define
class Harness:
    daemon: RunningDaemon
    node: Node
    plain: int
    tls: int
    context: ssl.SSLContext
    logs: LogReader

    async def play(self, pieces: tuple[bytes, ...], *, tls: bool) -> Observed:
        """Send one byte stream on a fresh connection; what the client, the node and the
        access log saw of it. Checks the invariant (raises AssertionError)."""
        before = len(self.node.requests)
        violations = len(self.node.violations)
        outcome = await run_connection(
            self.tls if tls else self.plain, pieces, self.context if tls else None
        )
        responses, garbage = parse_responses(outcome.received)
        # Settle: the access lines are written before the connection closes, and the node
        # answered every request l4gw relayed a response for; wait (bounded) for a node
        # request l4gw did not account for, or an access line still being written.
        lines: list[dict[str, Any]] = []
        for _ in range(40):
            lines = self.logs.requests_from(outcome.port)
            accounted = [line for line in lines if line.get("status") == 200]
            if len(lines) >= len(responses) and len(accounted) == len(self.node.requests) - before:
                break
            await trio.sleep(0.025)
        observed = Observed(
            outcome=outcome,
            responses=responses,
            garbage=garbage,
            node=self.node.requests[before:],
            violations=self.node.violations[violations:],
            lines=lines,
        )
        observed.check_invariant()
        return observed


@attrs.frozen
class Observed:
    outcome: Outcome
    responses: list[Response]
    garbage: bytes
    node: list[NodeRequest]
    violations: list[str]
    lines: list[dict[str, Any]]

    @property
    def statuses(self) -> tuple[int, ...]:
        return tuple(response.status for response in self.responses)

    def describe(self) -> str:
        node = [(r.method, r.target, r.body[:80]) for r in self.node]
        logged = [(e.get("method"), e.get("upstream_path"), e.get("status")) for e in self.lines]
        return (
            f"client got {self.statuses} ({self.outcome.ended}, garbage {self.garbage[:80]!r}); "
            f"node saw {node}; access lines {logged}; violations {self.violations}"
        )

    def check_invariant(self) -> None:
        """Every connection, whatever it sent: no request reached the node that l4gw did not
        account for, and every response went to the request it answers, in order."""
        where = self.describe()
        assert self.outcome.ended != "hang", f"no end within {CONNECTION_DEADLINE} s: {where}"
        assert not self.violations, f"l4gw sent the node bad framing: {where}"
        assert not self.garbage, f"the client got bytes that are no response: {where}"
        accounted = [line for line in self.lines if line.get("status") == 200]
        assert len(accounted) == len(self.node), f"node requests != accounted: {where}"
        for line, request in zip(accounted, self.node, strict=True):
            assert line.get("node") is not None, where
            assert line["method"] == request.method.decode("latin-1"), where
            assert line["upstream_path"] == request.target.decode("latin-1"), where
        # The client got the access lines' statuses, in order (gateway answers included), and
        # each node answer in the order the node parsed the requests. After a reset (bytes
        # sent after the gateway closed: RFC 9112 §9.6), the client may have lost the last
        # responses: what it got must still be the first ones, in order.
        logged = tuple(line["status"] for line in self.lines)
        numbers = [
            int(response.headers[b"x-node-request"])
            for response in self.responses
            if response.status == 200
        ]
        parsed = [request.number for request in self.node]
        if self.outcome.ended == "reset":
            assert self.statuses == logged[: len(self.statuses)], where
            assert numbers == parsed[: len(numbers)], where
        else:
            assert self.statuses == logged, where
            assert numbers == parsed, where
        for response, request in zip(
            (r for r in self.responses if r.status == 200), self.node, strict=False
        ):
            assert response.body == b"node %d %s %s" % (
                request.number,
                request.method,
                request.target,
            ), where


def gateway_config(node: int, plain: int, tls: int, cert: Path, key: Path) -> str:
    return f"""
[daemon]
admin = "{{admin}}"
log_format = "json"

[upstreams.node]
nodes = [{{ address = "127.0.0.1:{node}", weight = 1 }}]

[[listeners]]
name = "plain"
listen = "127.0.0.1:{plain}"
mode = "http"
upstream = "node"

[[listeners]]
name = "tls"
listen = "127.0.0.1:{tls}"
mode = "http"
upstream = "node"

[listeners.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
"""


async def start(nursery: trio.Nursery, l4gw_daemon: DaemonFactory, tmp_path: Path) -> Harness:
    node = Node()
    listeners = await nursery.start(partial(trio.serve_tcp, node.serve, 0, host="127.0.0.1"))
    node.port = listeners[0].socket.getsockname()[1]
    ca = trustme.CA()
    issued = ca.issue_cert(TLS_NAME)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    plain, tls = free_port(), free_port()
    daemon = await l4gw_daemon(gateway_config(node.port, plain, tls, cert, key))
    return Harness(daemon, node, plain, tls, context, LogReader(daemon))


async def check_daemon_health(harness: Harness) -> None:
    """The daemon is alive, answers /healthz, logged no traceback, and every request the node
    saw in the whole run is counted by the metrics with the node's status."""
    daemon = harness.daemon
    assert daemon.proc.poll() is None, daemon.stderr_text()[-4000:]
    code, _ = await daemon.get("/healthz")
    assert code == 200
    text = daemon.stderr_text()
    assert "Traceback" not in text, text[-4000:]
    errors = [e for e in harness.logs.read() if e.get("level") in ("error", "critical")]
    assert not errors, errors[:5]
    counted = 0.0
    for listener in ("plain", "tls"):
        counted += await daemon.metric(
            "l4gw_http_requests_total", listener=listener, route="default", status="200"
        )
    assert counted == len(harness.node.requests)
    assert not harness.node.violations


# -- the tests --------------------------------------------------------------------------------


def _expected_check(case: Case, observed: Observed) -> list[str]:
    problems = []
    if observed.statuses != case.statuses:
        problems.append(f"statuses {observed.statuses} != expected {case.statuses}")
    seen = [(r.method, r.target, r.body) for r in observed.node]
    want = [(e.method, e.target, e.body) for e in case.node]
    if seen != want:
        problems.append(f"node saw {seen} != expected {want}")
    for expected, request in zip(case.node, observed.node, strict=False):
        if expected.length is not None and request.header(b"content-length") != expected.length:
            problems.append(
                f"node Content-Length {request.header(b'content-length')!r} != {expected.length!r}"
            )
    return problems


@pytest.mark.parametrize("transport", ["plain", "tls"])
async def test_corpus(l4gw_daemon: DaemonFactory, tmp_path: Path, transport: str) -> None:
    """Every corpus case on a fresh connection: the expected statuses and node requests,
    and the invariant. All cases run; the failures are reported together."""
    cases = load_corpus()
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            harness = await start(nursery, l4gw_daemon, tmp_path)
            failures = []
            for case in cases:
                try:
                    observed = await harness.play(case.pieces, tls=transport == "tls")
                except AssertionError as exc:
                    failures.append(f"{case.name} [{case.cls}]: invariant: {exc}")
                    continue
                problems = _expected_check(case, observed)
                if problems:
                    failures.append(
                        f"{case.name} [{case.cls}]: {'; '.join(problems)} -- {observed.describe()}"
                    )
            try:
                await check_daemon_health(harness)
            except AssertionError as exc:
                failures.append(f"daemon: {exc}")
            assert not failures, "\n".join(failures)
            nursery.cancel_scope.cancel()


# -- mutations --------------------------------------------------------------------------------

_BOUNDARY = re.compile(rb"\r\n|\n|:| |,|;")
_INSERTS = [b"\r\n", *(bytes([byte]) for byte in b" \t\r\n\x00\x01\x0b\x7f,;0-")]


def _mutate_once(data: bytes, draw: st.DrawFn) -> bytes:
    """One mutation of ``data`` at a header boundary (or a CL/TE value)."""
    spots = [m.start() for m in _BOUNDARY.finditer(data)] or [0]
    kind = draw(st.sampled_from(["insert", "delete", "duplicate", "case", "value", "line"]))
    at = draw(st.sampled_from(spots))
    if kind == "insert":
        return data[:at] + draw(st.sampled_from(_INSERTS)) + data[at:]
    if kind == "delete":
        size = draw(st.integers(1, 3))
        return data[:at] + data[at + size :]
    if kind == "duplicate":
        size = draw(st.integers(1, 8))
        return data[: at + size] + data[at : at + size] + data[at + size :]
    if kind == "case":
        size = draw(st.integers(1, 16))
        return data[:at] + data[at : at + size].swapcase() + data[at + size :]
    if kind == "line":  # duplicate a whole header line
        lines = data.split(b"\r\n")
        if len(lines) < 3:
            return data
        index = draw(st.integers(1, len(lines) - 2))
        lines.insert(index, lines[index])
        return b"\r\n".join(lines)
    # A Content-Length or Transfer-Encoding value perturbed.
    match = re.search(rb"(?i)(content-length|transfer-encoding)[ \t]*:[ \t]*([^\r\n]*)", data)
    if match is None:
        return data
    value: bytes = draw(
        st.sampled_from(
            [
                b"0",
                b"1",
                b"5, 5",
                b"5,6",
                b"05",
                b" 5",
                b"chunked",
                b"Chunked",
                b"chunked, chunked",
                b"identity",
                b"999999999999999999999",
                match[2] + b" ",
                match[2][:-1],
                match[2] + b"0",
            ]
        )
    )
    return data[: match.start(2)] + value + data[match.end(2) :]


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[bytes, ...]:
    case = draw(st.sampled_from(_SEEDS))
    data = case.data
    for _ in range(draw(st.integers(1, 3))):
        data = _mutate_once(data, draw)
    if not data:
        data = b"\r\n"
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=4))))
    bounds = [0, *cuts, len(data)]
    pieces = tuple(data[a:b] for a, b in itertools.pairwise(bounds) if data[a:b])
    return pieces or (data,)


#: The seeds of the mutations: corpus cases small enough to mutate (not the 431 ones).
_SEEDS = [case for case in load_corpus() if len(case.data) < 2048]


async def test_mutations(l4gw_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Mutated corpus streams over both listeners: the invariant holds on every connection,
    and the daemon stays up and healthy."""
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            harness = await start(nursery, l4gw_daemon, tmp_path)
            played = 0

            # hypothesis runs in a worker thread; each example is played on the trio loop.
            @settings(
                max_examples=150,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(mutated_streams(), st.booleans())
            def check(pieces: tuple[bytes, ...], tls: bool) -> None:
                nonlocal played
                played += 1
                trio.from_thread.run(partial(harness.play, pieces, tls=tls))

            await trio.to_thread.run_sync(check)
            assert played >= 150
            await check_daemon_health(harness)
            nursery.cancel_scope.cancel()
