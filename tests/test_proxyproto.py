from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from l4gw.core.proxyproto import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeaderParser,
    ProxyInfo,
    ProxyProtocolError,
    encode_v1,
    encode_v1_unknown,
    encode_v2,
    encode_v2_local,
)

SIG = V2_SIGNATURE


def feed_all(data: bytes, chunks: list[int] | None = None) -> tuple[ProxyInfo | None, bytes]:
    """Feed ``data`` cut at the given sizes (one byte at a time by default)."""
    parser = ProxyHeaderParser()
    sizes = iter(chunks or [])
    pos = 0
    while pos < len(data):
        size = max(1, next(sizes, 1))
        info = parser.feed(data[pos : pos + size])
        pos += size
        if info is not None:
            return info, parser.remainder + data[pos:]
    return None, b""


def parse_whole(data: bytes) -> ProxyInfo:
    parser = ProxyHeaderParser()
    info = parser.feed(data)
    assert info is not None
    return info


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


V4_BODY = bytes([192, 0, 2, 1, 10, 0, 0, 1]) + (40000).to_bytes(2, "big") + (443).to_bytes(2, "big")


# --- encoding and roundtrips ---------------------------------------------------------------

ipv4s = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6s = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
ports = st.integers(0, 65535)


def _unmapped(text: str) -> str:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@st.composite
def address_pairs(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    family = draw(st.sampled_from([ipv4s, ipv6s]))
    return (draw(family), draw(ports)), (draw(family), draw(ports))


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["v1", "v2", "v1-unknown", "v2-local", "v2-tlv"]))
    if kind == "v1-unknown":
        return encode_v1_unknown()
    if kind == "v2-local":
        return encode_v2_local()
    src, dst = draw(address_pairs())
    if kind == "v1":
        return encode_v1(src, dst)
    tlvs = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=3))
    return encode_v2(src, dst, tlvs=tlvs if kind == "v2-tlv" else ())


@given(address_pairs(), st.binary(max_size=40), st.lists(st.integers(1, 30)))
def test_v1_roundtrip(
    pair: tuple[tuple[str, int], tuple[str, int]], after: bytes, chunks: list[int]
) -> None:
    src, dst = pair
    header = encode_v1(src, dst)
    assert header.endswith(b"\r\n")
    assert len(header) <= MAX_V1_LENGTH
    info, rest = feed_all(header + after, chunks)
    assert info is not None
    assert info.version == 1
    assert info.command == "proxy"
    assert info.source is not None
    assert info.destination is not None
    assert (_unmapped(info.source[0]), info.source[1]) == (_unmapped(src[0]), src[1])
    assert (_unmapped(info.destination[0]), info.destination[1]) == (_unmapped(dst[0]), dst[1])
    assert rest == after


@given(
    address_pairs(),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=50)), max_size=4),
    st.binary(max_size=40),
    st.lists(st.integers(1, 30)),
)
def test_v2_roundtrip(
    pair: tuple[tuple[str, int], tuple[str, int]],
    tlvs: list[tuple[int, bytes]],
    after: bytes,
    chunks: list[int],
) -> None:
    src, dst = pair
    info, rest = feed_all(encode_v2(src, dst, tlvs=tlvs) + after, chunks)
    assert info is not None
    assert info.version == 2
    assert info.command == "proxy"
    assert info.source is not None
    assert info.destination is not None
    assert (_unmapped(info.source[0]), info.source[1]) == (_unmapped(src[0]), src[1])
    assert (_unmapped(info.destination[0]), info.destination[1]) == (_unmapped(dst[0]), dst[1])
    assert info.tlvs == tuple(tlvs)
    assert rest == after


def test_encode_v1_exact() -> None:
    assert encode_v1(("192.0.2.1", 40000), ("10.0.0.1", 443)) == (
        b"PROXY TCP4 192.0.2.1 10.0.0.1 40000 443\r\n"
    )
    assert encode_v1(("2001:db8::1", 1), ("2001:db8::2", 0)) == (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 0\r\n"
    )
    # IPv4-mapped on both sides (a dual-stack listener, an IPv4 client): plain TCP4.
    assert encode_v1(("::ffff:192.0.2.1", 5), ("::ffff:10.0.0.1", 80)) == (
        b"PROXY TCP4 192.0.2.1 10.0.0.1 5 80\r\n"
    )
    # Really mixed: TCP6 with the IPv4 side mapped.
    assert encode_v1(("192.0.2.1", 5), ("2001:db8::2", 80)) == (
        b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 5 80\r\n"
    )
    assert encode_v1(("fe80::1%eth0", 5), ("fe80::2", 80)) == b"PROXY TCP6 fe80::1 fe80::2 5 80\r\n"
    assert encode_v1_unknown() == b"PROXY UNKNOWN\r\n"


def test_encode_v2_exact() -> None:
    assert encode_v2(("192.0.2.1", 40000), ("10.0.0.1", 443)) == v2(0x21, 0x11, V4_BODY)
    header = encode_v2(("2001:db8::1", 1), ("::ffff:10.0.0.1", 2))
    assert header[12:16] == b"\x21\x21\x00\x24"
    assert header[16:32] == ipaddress.IPv6Address("2001:db8::1").packed
    assert header[32:48] == ipaddress.IPv6Address("::ffff:10.0.0.1").packed
    assert header[48:] == b"\x00\x01\x00\x02"
    assert encode_v2_local() == SIG + b"\x20\x00\x00\x00"
    assert encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), tlvs=[(0x02, b"example.com")])[28:] == (
        b"\x02\x00\x0bexample.com"
    )


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("1.2.3.4", -1), ("1.2.3.4", 1)),
        (("1.2.3.4", 1), ("1.2.3.4", 65536)),
        (("example.com", 1), ("1.2.3.4", 1)),
        (("1.2.3.4", True), ("1.2.3.4", 1)),
    ],
)
def test_encoders_reject_bad_addresses(src: tuple[str, int], dst: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        encode_v1(src, dst)
    with pytest.raises(ValueError):
        encode_v2(src, dst)


def test_encode_v2_rejects_bad_tlvs() -> None:
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), tlvs=[(256, b"")])
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), tlvs=[(1, bytes(40000)), (2, bytes(40000))])


# --- parsing: results ---------------------------------------------------------------------


def test_parse_v1_results() -> None:
    assert parse_whole(b"PROXY TCP4 192.0.2.1 10.0.0.1 40000 443\r\n") == ProxyInfo(
        1, "proxy", ("192.0.2.1", 40000), ("10.0.0.1", 443), ()
    )
    info = parse_whole(b"PROXY TCP6 2001:DB8:0:0::1 ::1 0 65535\r\n")
    assert info.source == ("2001:db8::1", 0)
    assert info.destination == ("::1", 65535)
    assert parse_whole(b"PROXY UNKNOWN\r\n") == ProxyInfo(1, "proxy", None, None, ())
    # After UNKNOWN, anything up to the CRLF is ignored, as the spec requires.
    assert parse_whole(b"PROXY UNKNOWN \xff whatever 1 2\r\n").source is None
    longest = b"PROXY UNKNOWN " + b"f" * (MAX_V1_LENGTH - 16) + b"\r\n"
    assert len(longest) == MAX_V1_LENGTH
    assert parse_whole(longest).source is None


def test_parse_v2_results() -> None:
    assert parse_whole(v2(0x21, 0x11, V4_BODY)) == ProxyInfo(
        2, "proxy", ("192.0.2.1", 40000), ("10.0.0.1", 443), ()
    )
    # LOCAL: addresses and everything else in the block are ignored.
    assert parse_whole(v2(0x20, 0x11, V4_BODY)) == ProxyInfo(2, "local", None, None, ())
    assert parse_whole(v2(0x20, 0x00, b"junk")) == ProxyInfo(2, "local", None, None, ())
    assert parse_whole(v2(0x20, 0x12, b"")).command == "local"
    # PROXY over AF_UNSPEC or an UNSPEC transport: no addresses.
    assert parse_whole(v2(0x21, 0x00, b"")) == ProxyInfo(2, "proxy", None, None, ())
    assert parse_whole(v2(0x21, 0x10, b"\x01")).source is None
    # AF_UNIX: no addresses, TLVs kept.
    unix = parse_whole(v2(0x21, 0x31, bytes(216) + b"\x05\x00\x02id"))
    assert unix == ProxyInfo(2, "proxy", None, None, ((5, b"id"),))
    # TLVs after IPv4 addresses, including an empty one.
    info = parse_whole(v2(0x21, 0x11, V4_BODY + b"\x01\x00\x02h2\x04\x00\x00"))
    assert info.tlvs == ((1, b"h2"), (4, b""))
    # The largest allowed header.
    tlv = b"\xee" + (MAX_V2_LENGTH - 15).to_bytes(2, "big") + bytes(MAX_V2_LENGTH - 15)
    big = v2(0x21, 0x11, V4_BODY + tlv)
    assert len(big) == 16 + MAX_V2_LENGTH
    assert len(parse_whole(big).tlvs[0][1]) == MAX_V2_LENGTH - 15


@given(valid_headers(), st.binary(max_size=64), st.lists(st.integers(1, 64), max_size=50))
def test_any_chunking_gives_the_same_result(header: bytes, after: bytes, chunks: list[int]) -> None:
    whole = ProxyHeaderParser()
    expected = whole.feed(header + after)
    assert expected is not None
    assert whole.remainder == after
    assert feed_all(header + after) == (expected, after)  # one byte at a time
    assert feed_all(header + after, chunks) == (expected, after)


@given(valid_headers())
def test_no_strict_prefix_of_a_valid_header_is_complete(header: bytes) -> None:
    parser = ProxyHeaderParser()
    for i in range(len(header) - 1):
        assert parser.feed(header[i : i + 1]) is None
        assert parser.info is None
    assert parser.feed(header[-1:]) is not None


def test_remainder_holds_application_bytes() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None
    assert parser.remainder == b""
    info = parser.feed(b"\nGET / HTTP/1.1\r\n\r\n")
    assert info is not None
    assert parser.info == info
    assert parser.remainder == b"GET / HTTP/1.1\r\n\r\n"
    with pytest.raises(RuntimeError):
        parser.feed(b"more")
    parser = ProxyHeaderParser()
    assert parser.feed(encode_v2_local() + b"\x00\r\n") is not None
    assert parser.remainder == b"\x00\r\n"


# --- parsing: malformed headers --------------------------------------------------------------

V1_GOOD = b"PROXY TCP4 192.0.2.1 10.0.0.1 40000 443\r\n"

MALFORMED = {
    # neither version
    "http request": b"GET / HTTP/1.1\r\n\r\n",
    "tls hello": b"\x16\x03\x01\x02\x00\x01",
    "empty-ish": b"\x00",
    "lowercase proxy": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "PROXY without space": b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "bad v2 signature": b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12),
    "bad v2 signature start": b"\r\r",
    # v1
    "v1 unknown protocol": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 UDP4": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 UNKNOWNX": b"PROXY UNKNOWNX\r\n",
    "v1 no protocol": b"PROXY \r\n",
    "v1 LF only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "v1 CR only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
    "v1 CR CR LF": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
    "v1 UNKNOWN LF only": b"PROXY UNKNOWN\n",
    "v1 UNKNOWN stray CR": b"PROXY UNKNOWN a\rb\r\n",
    "v1 no CRLF in 107 bytes": b"PROXY UNKNOWN " + b"x" * 200,
    "v1 CRLF at 108": b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 15) + b"\r\n",
    "v1 double space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 double space later": b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n",
    "v1 trailing space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "v1 extra field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "v1 missing port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1 tab": b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
    "v1 TCP4 with IPv6": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v1 TCP6 with IPv4": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 bad IPv4": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "v1 IPv4 leading zero": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "v1 short IPv4": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v1 bad IPv6": b"PROXY TCP6 1:::2 ::1 1 2\r\n",
    "v1 IPv6 scope": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "v1 port too big": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "v1 port leading zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
    "v1 port 00": b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n",
    "v1 negative port": b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    "v1 hex port": b"PROXY TCP6 ::1 ::1 1a 2\r\n",
    "v1 long port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 1000000\r\n",
    "v1 non-ascii digit": "PROXY TCP4 1.2.3.4 5.6.7.8 1 \u0662\r\n".encode(),
    # v2
    "v2 version 1": v2(0x11, 0x11, V4_BODY),
    "v2 version 3": v2(0x31, 0x11, V4_BODY),
    "v2 command 2": v2(0x22, 0x11, V4_BODY),
    "v2 command 15": v2(0x2F, 0x11, V4_BODY),
    "v2 family 4": v2(0x21, 0x41, V4_BODY),
    "v2 family 15": v2(0x21, 0xF1, V4_BODY),
    "v2 transport 3": v2(0x21, 0x13, V4_BODY),
    "v2 LOCAL transport 3": v2(0x20, 0x03, b""),
    "v2 LOCAL family 5": v2(0x20, 0x50, b""),
    "v2 UDP over IPv4": v2(0x21, 0x12, V4_BODY),
    "v2 IPv4 block too short": v2(0x21, 0x11, V4_BODY[:11]),
    "v2 IPv6 with IPv4 length": v2(0x21, 0x21, V4_BODY),
    "v2 UNIX too short": v2(0x21, 0x31, bytes(215)),
    "v2 length too big": v2(0x21, 0x11, b"", length=MAX_V2_LENGTH + 1),
    "v2 length 65535": v2(0x21, 0x11, b"", length=0xFFFF),
    "v2 truncated TLV header": v2(0x21, 0x11, V4_BODY + b"\x01\x00"),
    "v2 TLV overruns": v2(0x21, 0x11, V4_BODY + b"\x01\x00\x05abcd"),
    "v2 TLV overruns by one": v2(0x21, 0x11, V4_BODY + b"\x01\x00\x03ab"),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_headers_are_rejected(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_whole(data)
    with pytest.raises(ProxyProtocolError):
        feed_all(data)


@pytest.mark.parametrize(
    ("data", "fails_at"),
    [
        (b"GET / HTTP/1.1\r\n", 1),
        (b"PROXX", 5),
        (b"\r\n\r\n\x01", 5),
        (b"PROXY TCP5", 10),
        (b"PROXY TCP4 1.2.3.4 x", 20),
        (b"PROXY TCP4  ", 12),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8\n", 27),
        (SIG + b"\x31", 13),
        (SIG + b"\x21\x41", 14),
        (SIG + b"\x21\x11\xff\xff", 16),
        (SIG + b"\x21\x21\x00\x0c", 16),
    ],
)
def test_rejection_is_early(data: bytes, fails_at: int) -> None:
    parser = ProxyHeaderParser()
    for i in range(fails_at - 1):
        assert parser.feed(data[i : i + 1]) is None
    with pytest.raises(ProxyProtocolError):
        parser.feed(data[fails_at - 1 : fails_at])
    with pytest.raises(ProxyProtocolError):  # stays failed
        parser.feed(b"\r\n")


def test_error_messages_say_what_was_wrong() -> None:
    def message(data: bytes) -> str:
        with pytest.raises(ProxyProtocolError) as info:
            parse_whole(data)
        return str(info.value)

    assert "not a PROXY protocol header" in message(b"GET / HTTP/1.1\r\n")
    assert "port '080'" in message(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n")
    assert "'1.2.3.256' is not an IPv4 address" in message(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n")
    assert "version 1 (must be 2)" in message(v2(0x11, 0x11, V4_BODY))
    assert "too short for AF_INET6" in message(v2(0x21, 0x21, V4_BODY))
    assert "exceeds the limit" in message(v2(0x21, 0x11, b"", length=0xFFFF))
    assert "no CRLF within 107 bytes" in message(b"PROXY UNKNOWN " + b"x" * 200)


def test_max_v2_length_is_configurable() -> None:
    header = v2(0x21, 0x11, V4_BODY + b"\x01\x00\x10" + bytes(16))
    parser = ProxyHeaderParser(max_v2_length=20)
    with pytest.raises(ProxyProtocolError):
        parser.feed(header)
    assert ProxyHeaderParser(max_v2_length=31).feed(header) is not None
    with pytest.raises(ValueError):
        ProxyHeaderParser(max_v2_length=70000)


# --- fuzzing -----------------------------------------------------------------------------


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_headers()) + draw(st.binary(max_size=20)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos]
        else:
            del data[pos:]
    return bytes(data)


def _check_fuzz(data: bytes, chunks: list[int]) -> None:
    try:
        info, rest = feed_all(data, chunks)
    except ProxyProtocolError:
        return
    if info is None:
        return
    consumed = len(data) - len(rest)
    assert data[consumed:] == rest
    # The header ended exactly where it was reported complete: one byte less is not a header.
    parser = ProxyHeaderParser()
    try:
        assert parser.feed(data[: consumed - 1]) is None
    except ProxyProtocolError:  # pragma: no cover - would also be a bug
        pytest.fail("a prefix of an accepted header was rejected")
    assert parse_whole(data[:consumed]) == info


@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20))
@example(b"PROXY UNKNOWN\r\n\r\n", [])
@example(SIG + b"\x20\x00\x00\x00", [])
def test_fuzz_random_bytes(data: bytes, chunks: list[int]) -> None:
    _check_fuzz(data, chunks)


@given(st.sampled_from([b"PROXY ", SIG]), st.binary(max_size=300), st.lists(st.integers(1, 40)))
def test_fuzz_after_a_valid_signature(prefix: bytes, data: bytes, chunks: list[int]) -> None:
    _check_fuzz(prefix + data, chunks)


@given(mutated_headers(), st.lists(st.integers(1, 40), max_size=20))
def test_fuzz_mutated_headers(data: bytes, chunks: list[int]) -> None:
    _check_fuzz(data, chunks)
