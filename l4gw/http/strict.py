"""Obsolete line folding in client request heads is refused. No I/O.

h11 unfolds obs-fold (a header line starting with a space or a tab continues the previous
one; RFC 9112 §5.2 allows that or a 400). A gateway in front of other parsers refuses it
instead, as nginx and HAProxy do, so no two parsers can disagree about where a header ends.
h11 has no switch for it, and h11 also parses for the health checker and the admin
endpoints, which must keep its rules; so the client side decides here, on the bytes, before
h11 parses a head:

* :func:`scan_head` follows the bytes of one request head as they arrive (the same bytes,
  in the same order, that go to ``h11.Connection.receive_data``) and says when the head is
  complete and has a folded line (:data:`REFUSE`). It allocates nothing.
* :func:`head_refusal` gives the message for such a head: the error h11 would raise if it
  refused folding itself (the request line and the header lines before the fold are checked
  first, with h11's grammar, so the message names the first defect, as h11 does). The caller
  raises ``h11.RemoteProtocolError(message)``: a 400.

Control characters in field values are refused here too (:func:`bad_field_value`): h11
takes any byte but NUL and whitespace in a value, so it passes ``\x01``-``\x08``,
``\x0e``-``\x1f`` and DEL on; RFC 9110 §5.5 makes them invalid, and a node that refuses them
(or cuts the value there) would read another request than the one the gateway checked.

A head is split into lines the way h11 splits it: it ends at the first ``LF [CR] LF``, lines
end with LF (a CR before it is dropped), and a buffer that starts with an empty line has no
request line (h11 refuses it on its own: nothing to do here).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "CONTROL_MESSAGE",
    "FOLD_MESSAGE",
    "REFUSE",
    "START",
    "bad_field_value",
    "head_refusal",
    "scan_head",
]

#: What h11 would say (with folding refused) about a folded line.
FOLD_MESSAGE = "obsolete header line folding is not accepted"

#: The refusal of a header value with a control character.
CONTROL_MESSAGE = "control character in a header value"
#: Control characters other than HTAB (CR, LF and NUL never reach here: h11 refuses them).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Scanner states (small ints, so the state is a plain attribute of the connection).
#: Nothing of the head yet.
START = 0
_START_CR = 1  # the head began with CR
_LINE = 2  # inside a line
_NL = 3  # just after an LF (a header line starts)
_NL_CR = 4  # just after LF CR
_FOLD = 8  # flag: a folded line was seen, the head is not complete yet
#: The head is complete (or not h11's to parse as a head): nothing to refuse here.
CLEAN = 16
#: The head is complete and has a folded line: refuse it (:func:`head_refusal`).
REFUSE = 17

#: The first blank line (the end of the head) or folded line, whichever comes first.
_EVENT = re.compile(rb"\n(?:\r?\n|[ \t])")
_BLANK = re.compile(rb"\n\r?\n")

# h11's grammar (h11/_abnf.py), used only to name the first defect of a refused head.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR = rb"[^\x00\s]"
_HEADER_FIELD = re.compile(
    _TOKEN + rb":[ \t]*(?:" + _FIELD_VCHAR + rb"+(?:[ \t]+" + _FIELD_VCHAR + rb"+)*)?[ \t]*"
)
_REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/[0-9]\.[0-9]")


def scan_head(state: int, data: bytes | bytearray) -> int:
    """The scanner's state after ``data``, the next bytes of a request head, in ``state``
    (:data:`START` for a new head). :data:`REFUSE`: the head is complete and a header line
    in it starts with a space or a tab. :data:`CLEAN`: the head is complete without one
    (bytes after the head are not looked at). Any other value: the head goes on."""
    if state >= CLEAN or not data:
        return state
    fold = state & _FOLD
    state ^= fold
    end = len(data)
    i = 0
    # The bytes that finish a pattern begun in the previous piece, one at a time.
    while state != _LINE:
        if i == end:
            return state | fold
        byte = data[i]
        i += 1
        if state == START:
            if byte == 0x0A:  # an empty first line
                return CLEAN
            state = _START_CR if byte == 0x0D else _LINE
        elif state == _START_CR:
            if byte == 0x0A:
                return CLEAN
            state = _LINE
        elif state == _NL:
            if byte == 0x0A:
                return REFUSE if fold else CLEAN
            if byte in (0x20, 0x09):
                fold = _FOLD
                state = _LINE
            else:
                state = _NL_CR if byte == 0x0D else _LINE
        else:  # _NL_CR
            if byte == 0x0A:
                return REFUSE if fold else CLEAN
            state = _LINE
    # Inside a line: the rest of the piece in C.
    while True:
        match = (_BLANK if fold else _EVENT).search(data, i)
        if match is None:
            break
        i = match.end()
        if data[i - 1] == 0x0A:
            return REFUSE if fold else CLEAN
        fold = _FOLD
    if data[end - 1] == 0x0A:
        return _NL | fold
    if end >= 2 and data[end - 1] == 0x0D and data[end - 2] == 0x0A:
        return _NL_CR | fold
    return _LINE | fold


def head_refusal(buffer: bytes | bytearray) -> str | None:
    """The message h11 would give (with folding refused) for the complete request head at
    the start of ``buffer``; None if the head has no folded line (or is not complete)."""
    end = _BLANK.search(buffer)
    if end is None or buffer[:1] == b"\n" or buffer[:2] == b"\r\n":
        return None
    lines = [line[:-1] if line[-1:] == b"\r" else line for line in buffer[: end.end()].split(b"\n")]
    del lines[-2:]
    if not any(line[:1] in (b" ", b"\t") for line in lines[1:]):
        return None
    if _REQUEST_LINE.fullmatch(lines[0]) is None:
        return f"illegal request line: {bytearray(lines[0])!r}"
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            return FOLD_MESSAGE
        if _HEADER_FIELD.fullmatch(line) is None:
            return f"illegal header line: {bytearray(line)!r}"
    return FOLD_MESSAGE  # not reached: a folded line was found above


def bad_field_value(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a header value (as h11 parsed it) has a control character other than HTAB."""
    search = _CONTROL.search
    return any(search(value) is not None for _, value in headers)
