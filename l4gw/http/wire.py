"""HTTP/1.1 on the node side, and the bytes the gateway writes: no I/O, no h11.

Client requests are parsed by h11 (the side where smuggling attempts come from). Everything
else on the hot path is done here with as little work per request as possible, because h11's
event objects, state machine and header re-validation cost more than the rest of the proxy
together (see ``docs/http.md``, Performance):

* :class:`ResponseReader` parses the node's responses (status line, headers, body framing by
  Content-Length, chunked, or until close; 1xx; HEAD/204/304 without a body). It is strict:
  a malformed response raises :class:`NodeProtocolError` (502 to the client) rather than
  being guessed at, since whatever the gateway passes on is re-framed and must be exact.
* :func:`request_head`, :func:`response_head`, :func:`chunk` and :data:`LAST_CHUNK` build
  the bytes sent. Header names and values passed in must already be valid (they come from
  h11's parser, this module's parser, or a validated configuration).

Limits: a response head larger than ``max_head`` (64 KiB by default) or a chunk-size line
over 1 KiB is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "LAST_CHUNK",
    "NodeProtocolError",
    "ResponseHead",
    "ResponseReader",
    "chunk",
    "frame_body",
    "lower_name",
    "request_head",
    "response_head",
]

Header = tuple[bytes, bytes]

#: The terminating chunk of a chunked body (no trailers).
LAST_CHUNK = b"0\r\n\r\n"

#: What every status line starts with: bytes that cannot begin it are an error at once.
_STATUS_START = b"HTTP/1."
_STATUS_RE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?\Z")
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TOKEN_RE = re.compile(_TOKEN + rb"\Z")
#: Control characters other than HTAB, CR and LF (CR and LF are checked separately).
_CONTROL_RE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: A header line: a token, a colon, a value without control characters (HTAB allowed).
_HEADER_RE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)\Z")
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?\Z")
_DIGITS_RE = re.compile(rb"[0-9]{1,19}\Z")
_MAX_CHUNK_LINE = 1024

# Body framing modes.
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3
# Chunked decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER = 0, 1, 2, 3


class NodeProtocolError(Exception):
    """The node sent something that is not valid HTTP/1.1 (the client gets 502)."""


class ResponseHead:
    """A parsed response head. ``headers`` are ``(lower-case name, value)`` pairs."""

    __slots__ = ("content_length", "framing", "headers", "keep_alive", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[Header],
        *,
        framing: int,
        content_length: int | None,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        #: One of NONE, LENGTH, CHUNKED, UNTIL_CLOSE (for this response to this request).
        self.framing = framing
        #: The node's valid Content-Length, if any (also kept for HEAD and 304).
        self.content_length = content_length
        #: False if the node will close (``Connection: close``, HTTP/1.0, body until close).
        self.keep_alive = keep_alive

    @property
    def chunked(self) -> bool:
        """The node announced a chunked body (for HEAD: would have)."""
        return self.framing == CHUNKED or (
            self.content_length is None and any(n == b"transfer-encoding" for n, _ in self.headers)
        )


class ResponseReader:
    """Incremental parser of the responses on one node connection.

    Feed bytes with :meth:`feed` (and :meth:`feed_eof` at EOF). Call :meth:`read_head`
    until it returns a head; for a 1xx head call it again for the next one. Then call
    :meth:`read_body` until :attr:`done`. Between responses, :meth:`reset` (only valid when
    the buffer holds nothing: bytes nobody asked for make a connection unusable).
    """

    __slots__ = (
        "_chunk_state",
        "_left",
        "_search_from",
        "buffer",
        "done",
        "eof",
        "framing",
        "max_head",
    )

    def __init__(self, *, max_head: int = 64 * 1024) -> None:
        self.max_head = max_head
        self.buffer = bytearray()
        self.eof = False
        self.done = False
        self.framing = NONE
        self._left = 0
        self._chunk_state = _SIZE
        self._search_from = 0

    def feed(self, data: bytes | bytearray) -> None:
        self.buffer += data

    def feed_eof(self) -> None:
        self.eof = True

    def reset(self) -> None:
        """Get ready for the next response on the same connection."""
        self.done = False
        self.framing = NONE
        self._left = 0
        self._chunk_state = _SIZE
        self._search_from = 0

    # -- head --------------------------------------------------------------------------

    def read_head(self, *, head_request: bool = False) -> ResponseHead | None:
        """The next response head, or None if more bytes are needed.

        Raises :class:`NodeProtocolError` for a malformed or oversized head, or EOF before a
        complete head (the message says whether any byte came).
        """
        buffer = self.buffer
        start = self._search_from
        end = buffer.find(b"\r\n\r\n", start)
        size = end + 4
        bare = buffer.find(b"\n\n", start, end if end >= 0 else len(buffer))
        if bare >= 0:  # a head ending in bare LFs (before any CRLF CRLF)
            end, size = bare, bare + 2
        if end < 0:
            # Not HTTP at all (a TLS record, an SSH banner, a binary protocol) often has no
            # CRLF CRLF to wait for: without this, the client would wait for the whole
            # ``response_timeout`` and get a 504 instead of a 502 now.
            if not _STATUS_START.startswith(bytes(buffer[: len(_STATUS_START)])):
                raise NodeProtocolError(f"malformed status line {bytes(buffer[:100])!r}")
            if len(buffer) > self.max_head:
                raise NodeProtocolError(f"response head larger than {self.max_head} bytes")
            if self.eof:
                raise NodeProtocolError(
                    "connection closed before a complete response head"
                    if buffer
                    else "connection closed before any response"
                )
            self._search_from = max(0, len(buffer) - 3)
            return None
        if size > self.max_head:
            raise NodeProtocolError(f"response head larger than {self.max_head} bytes")
        block = bytes(buffer[:end])
        del buffer[:size]
        self._search_from = 0
        # Checked once for the whole head: no control characters but HTAB, and CR only as
        # part of a line ending (so no value can smuggle a line break to the client).
        if _CONTROL_RE.search(block) is not None:
            raise NodeProtocolError("control character in the response head")
        if b"\r" in block and block.count(b"\r") != block.count(b"\r\n"):
            raise NodeProtocolError("bare CR in the response head")
        lines = block.split(b"\n")
        status_line = lines[0].removesuffix(b"\r")
        match = _STATUS_RE.match(status_line)
        if match is None:
            raise NodeProtocolError(f"malformed status line {status_line[:100]!r}")
        minor = match[1]
        status = int(match[2])
        reason = match[3] or b""
        headers: list[Header] = []
        content_length: int | None = None
        transfer_encoding: bytes | None = None
        connection = b""
        names = _NAMES
        for raw in lines[1:]:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            raw_name, colon, value = line.partition(b":")
            name = names.get(raw_name)
            if name is None:
                name = _header_name(raw_name, line) if colon else None
                if name is None:
                    if line[:1] in (b" ", b"\t"):
                        raise NodeProtocolError("obsolete header line folding in the response")
                    raise NodeProtocolError(f"malformed header line {line[:100]!r}")
            value = value.strip(b" \t")
            if name == b"content-length":
                content_length = _content_length(value, content_length)
            elif name == b"transfer-encoding":
                if transfer_encoding is not None:
                    transfer_encoding += b"," + value
                else:
                    transfer_encoding = value
            elif name == b"connection":
                connection += b"," + value.lower()
            headers.append((name, value))
        if connection:
            tokens = {token.strip() for token in connection.split(b",")}
            keep_alive = b"close" not in tokens if minor == b"1" else b"keep-alive" in tokens
        else:
            keep_alive = minor == b"1"
        if status < 200:
            if status == 101:
                return ResponseHead(
                    status,
                    reason,
                    headers,
                    framing=NONE,
                    content_length=None,
                    keep_alive=False,
                )
            return ResponseHead(
                status, reason, headers, framing=NONE, content_length=None, keep_alive=True
            )
        if transfer_encoding is not None:
            codings = [c.strip().lower() for c in transfer_encoding.split(b",")]
            if codings != [b"chunked"]:
                raise NodeProtocolError(
                    f"unsupported Transfer-Encoding {transfer_encoding[:100]!r} "
                    "(only chunked is accepted)"
                )
            if content_length is not None:
                # RFC 9112 §6.3: Transfer-Encoding wins; such a message must not be reused.
                content_length = None
                keep_alive = False
        if head_request or status in (204, 304):
            framing = NONE
        elif transfer_encoding is not None:
            framing = CHUNKED
        elif content_length is not None:
            framing = LENGTH
        else:
            framing = UNTIL_CLOSE
            keep_alive = False
        self.framing = framing
        self._left = content_length or 0
        self._chunk_state = _SIZE
        self.done = framing == NONE or (framing == LENGTH and self._left == 0)
        return ResponseHead(
            status,
            reason,
            headers,
            framing=framing,
            content_length=content_length,
            keep_alive=keep_alive,
        )

    # -- body --------------------------------------------------------------------------

    def read_body(self) -> bytes | None:
        """Body bytes available now (decoded from chunks), or None if more bytes are needed.

        Returns b"" once :attr:`done` becomes True with no more data. Raises
        :class:`NodeProtocolError` for bad chunk framing or EOF inside a body.
        """
        if self.done:
            return b""
        framing = self.framing
        buffer = self.buffer
        if framing == LENGTH:
            if not buffer:
                if self.eof:
                    raise NodeProtocolError(f"connection closed with {self._left} body bytes due")
                return None
            left = self._left
            if len(buffer) <= left:
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:left])
                del buffer[:left]
            self._left = left - len(data)
            if self._left == 0:
                self.done = True
            return data
        if framing == UNTIL_CLOSE:
            if buffer:
                data = bytes(buffer)
                buffer.clear()
                return data
            if self.eof:
                self.done = True
                return b""
            return None
        return self._read_chunked()

    def _read_chunked(self) -> bytes | None:
        buffer = self.buffer
        out: list[bytes] = []
        while True:
            state = self._chunk_state
            if state == _DATA:
                if not buffer:
                    break
                take = min(self._left, len(buffer))
                out.append(bytes(buffer[:take]))
                del buffer[:take]
                self._left -= take
                if self._left == 0:
                    self._chunk_state = _DATA_END
                continue
            line_end = buffer.find(b"\n")
            if line_end < 0:
                if len(buffer) > _MAX_CHUNK_LINE:
                    raise NodeProtocolError("chunk-size line too long")
                break
            line = bytes(buffer[:line_end]).removesuffix(b"\r")
            del buffer[: line_end + 1]
            if state == _SIZE:
                match = _CHUNK_SIZE_RE.match(line)
                if match is None:
                    raise NodeProtocolError(f"malformed chunk-size line {line[:100]!r}")
                size = int(match[1], 16)
                if size == 0:
                    self._chunk_state = _TRAILER
                else:
                    self._left = size
                    self._chunk_state = _DATA
            elif state == _DATA_END:
                if line:
                    raise NodeProtocolError("chunk data longer than its size")
                self._chunk_state = _SIZE
            else:  # _TRAILER: trailer fields are read and dropped
                if not line:
                    self.done = True
                    return b"".join(out)
                if _HEADER_RE.match(line) is None:
                    raise NodeProtocolError(f"malformed trailer line {line[:100]!r}")
        if out:
            return b"".join(out)
        if self.eof:
            raise NodeProtocolError("connection closed inside a chunked body")
        return None


#: Header names seen before, as sent -> lower case (skips the token check and lower()).
_NAMES: dict[bytes, bytes] = {}
_NAMES_MAX = 4096


def _header_name(raw_name: bytes, line: bytes) -> bytes | None:
    """The lower-case name if ``raw_name`` is a valid token (and remember it), else None."""
    if _TOKEN_RE.match(raw_name) is None:
        return None
    return lower_name(raw_name)


def lower_name(raw_name: bytes) -> bytes:
    """``raw_name`` (a valid token) in lower case, remembered for the next time."""
    name = _NAMES.get(raw_name)
    if name is None:
        name = raw_name.lower()
        if len(_NAMES) < _NAMES_MAX:
            _NAMES[raw_name] = name
    return name


def _content_length(value: bytes, previous: int | None) -> int:
    lengths = {part.strip() for part in value.split(b",")}
    if len(lengths) != 1:
        raise NodeProtocolError("conflicting Content-Length values")
    text = lengths.pop()
    if not _DIGITS_RE.match(text):
        raise NodeProtocolError(f"bad Content-Length {text[:40]!r}")
    length = int(text)
    if previous is not None and previous != length:
        raise NodeProtocolError("conflicting Content-Length headers")
    return length


# -- writing ---------------------------------------------------------------------------------


def request_head(method: bytes, target: bytes, headers: Iterable[Header]) -> bytes:
    """An HTTP/1.1 request head."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head(status: int, reason: bytes, headers: Iterable[Header]) -> bytes:
    """An HTTP/1.1 response head."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


#: What :func:`frame_body` stopped at.
MORE, DONE, FULL = 0, 1, 2


def frame_body(reader: ResponseReader, out: list[bytes], chunk_out: bool, limit: int) -> int:
    """Move the body bytes ``reader`` holds into ``out`` as they go to the client
    (re-chunked if ``chunk_out``, with the last chunk once the body is complete). Returns
    ``DONE`` (the whole body is in ``out``), ``MORE`` (the reader needs bytes from the node)
    or ``FULL`` (this call added ``limit`` bytes or more: write them first). Raises
    :class:`NodeProtocolError` for a broken body."""
    added = 0
    while True:
        data = reader.read_body()
        if data is None:
            return MORE
        if data:
            out.append(chunk(data) if chunk_out else data)
            added += len(data)
        if reader.done:
            if chunk_out:
                out.append(LAST_CHUNK)
            return DONE
        if added >= limit:
            return FULL


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (``data`` must not be empty)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
