"""Who may talk to the HTTP server, from where: Host, Origin and tokens (issue 12.5, 12.10).

* **Host** (DNS rebinding): a page on ``evil.example`` whose name is made to
  resolve to 127.0.0.1 reaches the server with ``Host: evil.example``. Only
  the bound address, the address the connection arrived on, ``localhost``,
  ``127.0.0.1``, ``[::1]`` and ``http.allowed_hosts`` entries are answered;
  anything else gets 421.
* **Origin** (CSRF): a browser sends ``Origin`` (and ``Sec-Fetch-Site``) with
  every state-changing request, also with a ``no-cors`` fetch and a plain
  form POST. Such a request is refused (403) unless it comes from the same
  origin as the page batchd serves itself. No CORS header is ever sent, so
  no other origin can read an answer either.
* **Tokens**: ``http.token`` is the operator's token (any user_id); each
  entry of ``http.users`` / ``http.users_file`` is one user's token, and that
  user becomes the upload's ``user_id``.
"""

from __future__ import annotations

import hmac
import unicodedata
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import urlsplit

from batchd.config import HttpSettings
from batchd.errors import ConfigError, Refusal

#: Always accepted as Host: the loopback names a local client uses.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
#: Sec-Fetch-Site values a browser sends for a request made by another page.
CROSS_SITE = ("cross-site", "same-site")
#: Methods that change nothing: not subject to the Origin rule.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_USER_ID_CHARS = 128


def normalize_user(value: str) -> str:
    """A user id as it is stored and rate-limited: NFKC-normalised and case-folded.

    ``Alice``, ``ALICE`` and ``Alice`` in full-width letters are one user.
    Look-alikes from other scripts (a Cyrillic A) stay distinct: without
    per-user tokens the rate limit is advisory (see README, HTTP security).
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold()).strip()


def parse_user_id(value: str) -> str:
    """A user id given by the client (empty means ``anonymous``), normalised."""
    if any(unicodedata.category(c)[0] == "C" for c in value):
        raise Refusal(400, f"user_id must be at most {MAX_USER_ID_CHARS} printable characters")
    user = normalize_user(value)
    if not user:
        return "anonymous"
    if len(user) > MAX_USER_ID_CHARS:
        raise Refusal(400, f"user_id must be at most {MAX_USER_ID_CHARS} printable characters")
    return user


# -- Host and Origin -------------------------------------------------------------


def _split_host(value: str) -> tuple[str, str]:
    """``(host, port)`` of a Host header value; the host lower-cased, port "" when absent."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value.partition("]")
        return host + "]", rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port
    return value, ""


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def host_allowed(host_header: str, settings: HttpSettings, local_address: str) -> bool:
    """True when ``host_header`` names this server, not a rebound DNS name."""
    host, port = _split_host(host_header)
    if port and not port.isdigit():
        return False
    names = {*LOOPBACK_HOSTS, _bracket(settings.host.lower()), _bracket(local_address.lower())}
    if host in names:
        return True
    for entry in settings.allowed_hosts:
        allowed, allowed_port = _split_host(entry)
        if host == allowed and (not allowed_port or allowed_port == port):
            return True
    return False


def check_request(
    method: str, headers: Message, settings: HttpSettings, local_address: str
) -> None:
    """Refuse a request with a foreign Host (421) or a cross-site state change (403)."""
    host = headers.get("Host")
    # A request without Host is not from a browser (every browser sends one).
    if host is not None and not host_allowed(host, settings, local_address):
        raise Refusal(
            421,
            f"Host {host.strip()!r} is not this server's name: add it to http.allowed_hosts"
            " if clients really use it (refused to block DNS rebinding)",
        )
    if method in SAFE_METHODS:
        return
    site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
    if site in CROSS_SITE:
        raise Refusal(
            403,
            f"cross-site request refused (Sec-Fetch-Site: {site}): batchd accepts"
            f" {method} only from its own page or from non-browser clients",
        )
    origin = headers.get("Origin")
    if origin is None:
        return  # not a browser, or a same-origin GET-like request
    parts = urlsplit(origin.strip())
    same = (
        parts.scheme in ("http", "https")
        and host is not None
        and _split_host(parts.netloc) == _split_host(host)
    )
    if not same:
        raise Refusal(
            403,
            f"cross-origin request refused (Origin: {origin.strip()!r}): batchd accepts"
            f" {method} only from its own page or from non-browser clients",
        )


# -- tokens ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a request: the operator (``user`` None) or one user."""

    user: str | None
    admin: bool


OPERATOR = Identity(None, True)


def read_users_file(path: Path) -> dict[str, str]:
    """``user -> token`` from a file of ``user token`` lines (``#`` comments, blank lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"http.users_file {path} cannot be read: {exc.strerror}; create it with one"
            " 'user token' line per user, readable by batchd"
        ) from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or len(fields[1]) < 16:
            raise ConfigError(
                f"http.users_file {path} line {number}: expected 'user token' with a token"
                " of at least 16 characters"
            )
        users[fields[0]] = fields[1]
    return users


class Tokens:
    """The tokens a request may carry, built from the settings (and users file)."""

    def __init__(self, settings: HttpSettings) -> None:
        self.admin = settings.token.encode()
        users = dict(settings.users)
        if settings.users_file is not None:
            users.update(read_users_file(settings.users_file))
        self.users = [(normalize_user(user), token.encode()) for user, token in users.items()]

    @property
    def required(self) -> bool:
        """True when requests must carry a token (one is configured)."""
        return bool(self.admin or self.users)

    def identify(self, headers: Message) -> Identity | None:
        """The request's identity, or None when it carries no valid token.

        With no token configured at all every request is the operator's (the
        open default for a server bound to loopback).
        """
        if not self.required:
            return OPERATOR
        scheme, _, given = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        # Header text is latin-1 decoded by http.client: encoding it back gives
        # the raw bytes, which a UTF-8 token matches.
        raw = given.strip().encode("latin-1", "replace")
        found: Identity | None = None
        # Compare with every token (constant time each), so timing tells nothing.
        if self.admin and hmac.compare_digest(raw, self.admin):
            found = OPERATOR
        for user, token in self.users:
            if hmac.compare_digest(raw, token) and found is None:
                found = Identity(user, False)
        return found
