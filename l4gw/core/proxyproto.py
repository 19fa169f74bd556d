"""The PROXY protocol, versions 1 (text) and 2 (binary): encoders and an incremental parser.

No I/O. The reference is HAProxy's ``doc/proxy-protocol.txt``. A listener with
``accept_proxy_protocol`` feeds what it receives into a ``ProxyHeaderParser`` until it returns
a ``ProxyInfo``, then forwards ``parser.remainder`` (application bytes that arrived in the same
segment) before anything else. An upstream with ``proxy_protocol = "v1"``/``"v2"`` sends
``encode_v1``/``encode_v2`` of the client and listener addresses before the first byte of
data; health checks send ``encode_v2_local()`` (or ``encode_v1_unknown()``).

Strictness, receiving:

* The first byte decides: ``P`` can only start v1 (``"PROXY "``), ``\\r`` only v2 (the
  12-byte signature); anything else is refused at once, as is the first byte that departs
  from either prefix. A header is never reported complete before its last byte.
* v1: at most 107 bytes including the CRLF (the spec's limit); exactly one space between
  fields; ``TCP4`` addresses are dotted quads without leading zeros, ``TCP6`` addresses are
  IPv6 literals without a ``%scope``; ports are decimal 0..65535 without leading zeros
  (``"0"`` itself is fine). ``PROXY UNKNOWN`` may be followed by a space and anything up to
  the CRLF, which is ignored (as the spec requires). A CR not followed by LF, or an LF not
  preceded by CR, is an error (no lenient line endings that another parser might read
  differently).
* v2: the version nibble must be 2, the command 0 (LOCAL) or 1 (PROXY), the family 0..3
  and the transport 0..2 (the spec says other values must be rejected). The length after the
  fixed 16 bytes may not exceed ``max_v2_length`` (default ``MAX_V2_LENGTH`` = 4312: the
  largest address block, AF_UNIX's 216 bytes, plus 4 KiB of TLVs; cloud load balancers send
  well under 200 bytes of TLVs). With the PROXY command over STREAM, the length must hold
  the family's address block (12 bytes for AF_INET, 36 for AF_INET6, 216 for AF_UNIX) and
  what follows must be whole TLVs. DGRAM (UDP) is refused: this is a TCP gateway, so such a
  header cannot describe the connection it arrives on.
* v2 results: LOCAL (health checks of the peer in front) gives ``command="local"``, no
  addresses, no TLVs (the spec says to ignore the whole block). PROXY over AF_UNSPEC or an
  UNSPEC transport gives no addresses and no TLVs (the receiver "should ignore address
  information"). AF_UNIX gives no addresses (they mean nothing to a TCP backend) but keeps
  the TLVs. The CRC32C TLV is returned like any other, not verified (the spec makes
  verification optional).

Sending: both encoders take ``(ip, port)`` pairs. When both addresses are IPv4 or IPv4-mapped
IPv6 (``::ffff:1.2.3.4``, what a dual-stack listener reports for an IPv4 client), the header
is TCP4/AF_INET with plain IPv4 addresses, so backends see the client as IPv4 whatever the
listener's socket family. When the families are mixed otherwise (one real IPv6 address), the
IPv4 one is written IPv4-mapped and the header is TCP6/AF_INET6: the client's address is
never dropped in favour of ``UNKNOWN``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Literal

import attrs

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeaderParser",
    "ProxyInfo",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v1_unknown",
    "encode_v2",
    "encode_v2_local",
]

#: The whole v1 line, "PROXY" to CRLF, is at most this long (the spec's worst case,
#: "PROXY UNKNOWN" with two full-length IPv6 addresses and two 5-digit ports).
MAX_V1_LENGTH = 107
#: Default bound on the v2 length field (bytes after the fixed 16-byte part).
MAX_V2_LENGTH = 216 + 4096

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/transport, 2-byte length

_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM = 0x0, 0x1, 0x2
_ADDRESS_BLOCK = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_FAMILY_NAMES = {
    _AF_UNSPEC: "AF_UNSPEC",
    _AF_INET: "AF_INET",
    _AF_INET6: "AF_INET6",
    _AF_UNIX: "AF_UNIX",
}

# v1 protocol tokens and what may follow them on the line.
_V1_TOKENS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
_V1_TCP4_CHARS = b"0123456789. "
_V1_TCP6_CHARS = b"0123456789abcdefABCDEF:. "
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """A malformed or unacceptable PROXY protocol header; the message says what was wrong."""

    status_hint = 400


@attrs.frozen
class ProxyInfo:
    """A received PROXY header.

    ``source``/``destination`` are ``(ip, port)`` with the IP normalised as ``ipaddress``
    prints it, or None when the header carries no usable addresses (v1 ``UNKNOWN``, v2
    LOCAL, AF_UNSPEC or AF_UNIX): the caller then uses the real connection's addresses.
    ``tlvs`` are the v2 type-length-value extensions in order, as ``(type, value)``.
    """

    version: int
    command: Literal["proxy", "local"]
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


# --- encoding -------------------------------------------------------------------------


def _normalise(
    src: Address, dst: Address
) -> (
    tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]
    | tuple[ipaddress.IPv6Address, ipaddress.IPv6Address]
):
    """Both IPs in one family, by the rule in the module docstring. Raises ``ValueError``."""
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for host, port in (src, dst):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"port {port!r} is not an integer 0..65535")
        ip = ipaddress.ip_address(host.partition("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        ips.append(ip)
    a, b = ips
    if isinstance(a, ipaddress.IPv4Address) and isinstance(b, ipaddress.IPv4Address):
        return (a, b)
    return (_as_v6(a), _as_v6(b))


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address((0xFFFF << 32) | int(ip))


def encode_v1(src: Address, dst: Address) -> bytes:
    """The v1 line for a TCP connection from ``src`` to ``dst`` (``TCP4`` or ``TCP6``)."""
    src_ip, dst_ip = _normalise(src, dst)
    protocol = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {protocol} {src_ip} {dst_ip} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v1_unknown() -> bytes:
    """The v1 line saying "no addresses": the receiver uses the real connection's."""
    return b"PROXY UNKNOWN\r\n"


def encode_v2(src: Address, dst: Address, *, tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """The v2 header (PROXY command, TCP over IPv4 or IPv6), with optional TLVs."""
    src_ip, dst_ip = _normalise(src, dst)
    family = _AF_INET if src_ip.version == 4 else _AF_INET6
    body = bytearray(src_ip.packed + dst_ip.packed)
    body += src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type {kind} / length {len(value)} out of range")
        body += bytes([kind]) + len(value).to_bytes(2, "big") + value
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header body of {len(body)} bytes exceeds 65535")
    head = bytes([0x20 | _CMD_PROXY, family << 4 | _TRANSPORT_STREAM])
    return V2_SIGNATURE + head + len(body).to_bytes(2, "big") + bytes(body)


def encode_v2_local() -> bytes:
    """The v2 LOCAL header (AF_UNSPEC, no addresses): the sender's own connection, e.g. a
    health check; the receiver uses the real connection's addresses."""
    return V2_SIGNATURE + bytes([0x20 | _CMD_LOCAL, 0x00]) + b"\x00\x00"


# --- parsing --------------------------------------------------------------------------


class ProxyHeaderParser:
    """Reads one PROXY v1 or v2 header from bytes arriving in any chunking.

    ``feed(data)`` returns None while more bytes are needed and the ``ProxyInfo`` once the
    header is complete; ``remainder`` then holds the bytes received after the header, which
    belong to the application stream and must be forwarded. At most ``MAX_V1_LENGTH`` or
    ``16 + max_v2_length`` bytes are buffered before a decision.

    Error handling: a malformed header raises ``ProxyProtocolError`` (from the ``feed`` that
    supplied the offending byte, as early as that byte is known to be wrong); the parser then
    stays failed and raises again on any further ``feed``. Feeding after completion is a
    programming error (``RuntimeError``). The caller should bound the time it waits for a
    header: a peer that sends a valid prefix and stops keeps ``feed`` returning None.
    """

    def __init__(self, *, max_v2_length: int = MAX_V2_LENGTH) -> None:
        if not 0 <= max_v2_length <= 0xFFFF:
            raise ValueError("max_v2_length must be 0..65535")
        self.max_v2_length = max_v2_length
        self._buffer = bytearray()
        self._version = 0  # 0 = not yet known
        self._scanned = 0  # v1: bytes already checked
        self._info: ProxyInfo | None = None
        self._error: str | None = None
        self.remainder: bytes = b""

    @property
    def info(self) -> ProxyInfo | None:
        """The header once complete, else None."""
        return self._info

    def feed(self, data: bytes) -> ProxyInfo | None:
        """Add received bytes; the header once complete, None if more bytes are needed."""
        if self._info is not None:
            raise RuntimeError("PROXY header already complete; forward .remainder")
        if self._error is not None:
            raise ProxyProtocolError(self._error)
        self._buffer += data
        try:
            info = self._advance()
        except ProxyProtocolError as exc:
            self._error = str(exc)
            self._buffer.clear()
            raise
        if info is not None:
            self._info = info
        return info

    def _advance(self) -> ProxyInfo | None:
        if self._version == 0:
            self._version = self._detect()
            if self._version == 0:
                return None
        if self._version == 1:
            return self._advance_v1()
        return self._advance_v2()

    def _detect(self) -> int:
        buf = self._buffer
        v1 = bytes(buf[: len(V1_PREFIX)])
        v2 = bytes(buf[: len(V2_SIGNATURE)])
        if V1_PREFIX.startswith(v1):
            return 1 if len(v1) == len(V1_PREFIX) else 0
        if V2_SIGNATURE.startswith(v2):
            return 2 if len(v2) == len(V2_SIGNATURE) else 0
        first = bytes(buf[:1])
        expected = "'PROXY '" if first == b"P" else "the v2 signature"
        if first not in (b"P", b"\r"):
            expected = "'PROXY ' (v1) or the v2 signature"
        raise ProxyProtocolError(
            f"not a PROXY protocol header: expected {expected}, got {bytes(buf[:16])!r}"
        )

    # v1 ----------------------------------------------------------------------------

    def _advance_v1(self) -> ProxyInfo | None:
        buf = self._buffer
        end = buf.find(b"\n", self._scanned, MAX_V1_LENGTH)
        checked_to = end + 1 if end >= 0 else min(len(buf), MAX_V1_LENGTH)
        self._check_v1_prefix(buf, checked_to)
        self._scanned = checked_to
        if end < 0:
            if len(buf) >= MAX_V1_LENGTH:
                raise ProxyProtocolError(
                    f"PROXY v1 header has no CRLF within {MAX_V1_LENGTH} bytes"
                )
            return None
        info = _parse_v1_line(bytes(buf[: end - 1]))
        self.remainder = bytes(buf[end + 1 :])
        buf.clear()
        return info

    def _check_v1_prefix(self, buf: bytearray, upto: int) -> None:
        """Early checks on ``buf[:upto]``: reject as soon as no valid line can follow."""
        token_end = len(V1_PREFIX) + 8
        token = bytes(buf[len(V1_PREFIX) : min(upto, token_end)])
        if not any(t.startswith(token) or token.startswith(t) for t in _V1_TOKENS):
            raise ProxyProtocolError(
                f"PROXY v1: unknown protocol {token!r} (expected TCP4, TCP6 or UNKNOWN)"
            )
        line = bytes(buf[:upto])
        # The first LF (if any) ends the line; the only CR allowed is the one right before it.
        cr = line.find(b"\r")
        if line.endswith(b"\n"):
            if cr != len(line) - 2:
                what = "LF not preceded by CR" if cr < 0 or cr == len(line) - 1 else "stray CR"
                raise ProxyProtocolError(f"PROXY v1: line must end with CRLF ({what})")
        elif 0 <= cr < len(line) - 1:
            raise ProxyProtocolError("PROXY v1: CR not followed by LF")
        if token.startswith((b"TCP4", b"TCP6")):
            fields = line[len(V1_PREFIX) + 5 :].rstrip(b"\n").rstrip(b"\r")
            allowed = _V1_TCP4_CHARS if token.startswith(b"TCP4") else _V1_TCP6_CHARS
            bad = fields.translate(None, allowed)
            if bad:
                raise ProxyProtocolError(
                    f"PROXY v1 {token[:4].decode()}: unexpected character {bad[:1]!r}"
                )
            if b"  " in line or line.count(b" ") > 5:
                raise ProxyProtocolError("PROXY v1: fields must be separated by single spaces")

    # v2 ----------------------------------------------------------------------------

    def _advance_v2(self) -> ProxyInfo | None:
        buf = self._buffer
        have = len(buf)
        if have > 12:
            version, command = buf[12] >> 4, buf[12] & 0x0F
            if version != 2:
                raise ProxyProtocolError(f"PROXY v2: version {version} (must be 2)")
            if command not in (_CMD_LOCAL, _CMD_PROXY):
                raise ProxyProtocolError(f"PROXY v2: command {command} (must be 0 or 1)")
        if have > 13:
            family, transport = buf[13] >> 4, buf[13] & 0x0F
            if family not in _FAMILY_NAMES:
                raise ProxyProtocolError(f"PROXY v2: address family {family} (must be 0..3)")
            if transport > _TRANSPORT_DGRAM:
                raise ProxyProtocolError(f"PROXY v2: transport {transport} (must be 0..2)")
            if command == _CMD_PROXY and transport == _TRANSPORT_DGRAM:
                raise ProxyProtocolError(
                    "PROXY v2: DGRAM (UDP) transport on a TCP connection is not supported"
                )
        if have < _V2_FIXED:
            return None
        length = int.from_bytes(buf[14:16], "big")
        if length > self.max_v2_length:
            raise ProxyProtocolError(
                f"PROXY v2: length {length} exceeds the limit of {self.max_v2_length} bytes"
            )
        known = command == _CMD_PROXY and transport == _TRANSPORT_STREAM and family != _AF_UNSPEC
        if known and length < _ADDRESS_BLOCK[family]:
            raise ProxyProtocolError(
                f"PROXY v2: length {length} is too short for {_FAMILY_NAMES[family]} "
                f"addresses ({_ADDRESS_BLOCK[family]} bytes)"
            )
        total = _V2_FIXED + length
        if have < total:
            return None
        body = bytes(buf[_V2_FIXED:total])
        if command == _CMD_LOCAL:
            info = ProxyInfo(version=2, command="local", source=None, destination=None)
        elif not known:
            info = ProxyInfo(version=2, command="proxy", source=None, destination=None)
        else:
            info = _parse_v2_body(family, body)
        self.remainder = bytes(buf[total:])
        buf.clear()
        return info


def _parse_v2_body(family: int, body: bytes) -> ProxyInfo:
    """Addresses and TLVs of a PROXY command over STREAM with a known family."""
    block = _ADDRESS_BLOCK[family]
    source: Address | None = None
    destination: Address | None = None
    if family != _AF_UNIX:
        size = 4 if family == _AF_INET else 16
        ip_class = ipaddress.IPv4Address if family == _AF_INET else ipaddress.IPv6Address
        ports = body[2 * size : 2 * size + 4]
        source = (str(ip_class(body[:size])), int.from_bytes(ports[:2], "big"))
        destination = (str(ip_class(body[size : 2 * size])), int.from_bytes(ports[2:], "big"))
    tlvs: list[tuple[int, bytes]] = []
    pos = block
    while pos < len(body):
        if pos + 3 > len(body):
            raise ProxyProtocolError(
                f"PROXY v2: truncated TLV at offset {pos} ({len(body) - pos} bytes left)"
            )
        kind, size = body[pos], int.from_bytes(body[pos + 1 : pos + 3], "big")
        if pos + 3 + size > len(body):
            raise ProxyProtocolError(
                f"PROXY v2: TLV type 0x{kind:02x} of length {size} at offset {pos} "
                "overruns the header"
            )
        tlvs.append((kind, body[pos + 3 : pos + 3 + size]))
        pos += 3 + size
    return ProxyInfo(
        version=2, command="proxy", source=source, destination=destination, tlvs=tuple(tlvs)
    )


def _parse_v1_line(line: bytes) -> ProxyInfo:
    """Parse a complete v1 line without its CRLF (already checked character by character)."""
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyInfo(version=1, command="proxy", source=None, destination=None)
    parts = line.decode("ascii").split(" ")
    if len(parts) != 6 or "" in parts:
        raise ProxyProtocolError(
            "PROXY v1: expected 'PROXY TCP4|TCP6 <src> <dst> <sport> <dport>' "
            f"with single spaces, got {line!r}"
        )
    _, protocol, src, dst, sport, dport = parts
    version = 4 if protocol == "TCP4" else 6
    return ProxyInfo(
        version=1,
        command="proxy",
        source=(_v1_ip(src, version, "source"), _v1_port(sport, "source")),
        destination=(_v1_ip(dst, version, "destination"), _v1_port(dport, "destination")),
    )


def _v1_ip(text: str, version: int, what: str) -> str:
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address
        ip = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(
            f"PROXY v1 TCP{version}: {what} address {text!r} is not an IPv{version} address"
        ) from None
    return str(ip)


def _v1_port(text: str, what: str) -> int:
    if _V1_PORT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyProtocolError(
            f"PROXY v1: {what} port {text!r} is not a decimal 0..65535 without leading zeros"
        )
    return int(text)
