"""A request's header block, read and checked in one pass (issue 15).

``http.server`` hands every header block to the email package's feed
parser: about 15 % of the HTTP process's CPU per request, for a format far
looser than HTTP's. A header field is ``name ":" OWS value OWS`` on one
line (RFC 9112 section 5); that is all this reads, with the caps
``http.client`` enforces (a line over :data:`MAX_HEADER_LINE_BYTES`, more
than :data:`MAX_HEADERS` fields: 431) and the refusals RFC 9112 asks of a
server, which the email parser let through:

* a line that is not a field (no colon, an empty or non-token name,
  whitespace before the colon, a folded continuation line): 400, where the
  email parser silently took it and every line after it for a body;
* a ``Content-Length`` that is not ASCII digits (``int()`` took ``+5``,
  ``1_0`` or `` 5``, a length a proxy in front reads otherwise or not at
  all), or two that disagree: 400 (which one frames the body is what
  request smuggling plays on);
* two ``Host`` fields: 400 (the Host guard checks one name);
* two ``Authorization`` fields: 400 (the token check reads the first, a
  proxy in front may have checked the last);
* a CR or NUL byte inside a value: 400;
* a header block the connection's end cut off (no blank line): 400, where
  the email parser took what had come as the whole request and it was
  answered.

The result is a :class:`email.message.Message`, as before, so every reader
(``get``, ``in``, ``get_all``) behaves as it did.
"""

from __future__ import annotations

import re
from email.message import Message
from typing import Protocol

from batchd.errors import Refusal

#: The longest header line accepted (http.client's own cap, _MAXLINE).
MAX_HEADER_LINE_BYTES = 65_536
#: The most header fields in one request (http.client's cap, _MAXHEADERS).
MAX_HEADERS = 100

# RFC 9110 section 5.6.2: a field name is a token.
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_END = (b"\r\n", b"\n")
# RFC 9112 section 6.3: Content-Length = 1*DIGIT, nothing else.
_LENGTH = re.compile(rb"[0-9]+")


class Lines(Protocol):
    """What the headers are read from: the connection's buffered reader."""

    def readline(self, size: int | None = -1, /) -> bytes: ...


def read_headers(rfile: Lines) -> Message:
    """The header fields up to the blank line, from ``rfile`` (after the request line).

    Raises :class:`Refusal` (431 or 400) for a block that breaks the caps or
    the rules above; the caller closes the connection after answering it.
    """
    message = Message()
    count = 0
    lengths: set[bytes] = set()
    hosts = 0
    authorizations = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE_BYTES + 1)
        if len(line) > MAX_HEADER_LINE_BYTES:
            raise Refusal(431, f"a header line is over {MAX_HEADER_LINE_BYTES} bytes")
        if line in _END:
            break
        if not line or not line.endswith(b"\n"):
            # The connection ended inside the header block: an incomplete
            # request (RFC 9112 section 8) is not acted on, however it began.
            raise Refusal(400, "the connection ended before the header block did")
        count += 1
        if count > MAX_HEADERS:
            raise Refusal(431, f"more than {MAX_HEADERS} header fields")
        name, colon, value = line.partition(b":")
        if not colon or _NAME.fullmatch(name) is None:
            # Also a folded line (it starts with whitespace: obsolete, RFC 9112 5.2).
            shown = line[:80].decode("latin-1").rstrip("\r\n")
            raise Refusal(400, f"malformed header line {shown!r}: expected 'Name: value'")
        value = value.strip(b" \t\r\n")
        if b"\r" in value or b"\0" in value:
            raise Refusal(400, f"header {name.decode('latin-1')!r} holds a CR or NUL byte")
        lower = name.lower()
        if lower == b"content-length":
            if _LENGTH.fullmatch(value) is None:
                shown = value[:40].decode("latin-1")
                raise Refusal(400, f"Content-Length must be a byte count in digits, not {shown!r}")
            lengths.add(value)
            if len(lengths) > 1:
                raise Refusal(400, "two Content-Length headers that disagree")
        elif lower == b"host":
            hosts += 1
            if hosts > 1:
                raise Refusal(400, "more than one Host header")
        elif lower == b"authorization":
            authorizations += 1
            if authorizations > 1:
                raise Refusal(400, "more than one Authorization header: send one token")
        # Latin-1, as http.client decodes header text (a UTF-8 token is
        # encoded back to its bytes by httpguard).
        message[name.decode("latin-1")] = value.decode("latin-1")
    return message
