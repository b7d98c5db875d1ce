"""Credentials out of everything Blinkflow prints or serves: logs, summaries, metric labels, API replies.

One place decides what a secret is: a URL's user info, any query parameter whose *name* looks like
a credential (``password``, ``token``, ``X-Amz-Signature``, ``X-Goog-Credential``, ``sig``, ``jwt``,
``session`` ...), bearer tokens, and the passwords of the URLs a run has opened, wherever they
reappear in free text (FFmpeg quotes the URLs it fails on).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
#: parameter names that are credentials in full (after dropping x-amz-/x-goog-/x- prefixes)
SECRET_NAMES = {"password", "passwd", "pwd", "pass", "token", "auth", "key", "apikey", "api_key", "secret", "signature",
                "sig", "credential", "credentials", "passphrase", "session", "sessionid", "jwt", "code", "security-token",
                "securitytoken", "client_secret", "access_token", "auth_token", "refresh_token", "id_token", "loginpas", "pw",
                "psw", "pswd"}
#: a parameter name containing one of these is a credential too (auth_token, x-amz-security-token, mysecret)
SECRET_PARTS = ("pass", "token", "secret", "signature", "credential", "session", "jwt", "apikey", "api_key", "auth")
_PREFIXES = ("x-amz-", "x-goog-", "x-ms-", "x-")

#: the scheme is bounded (schemes are short): unbounded, every word of "a.a.a..." rescanned the rest (2 s for 64 KB,
#: the interpreter lock held, from one request line the control endpoint logged)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://)(?P<userinfo>[^/@\s'\"<>]+)@")
#: key=value after a query separator, or standing as a word in free text ("token=..." in an error)
_QUERY_PAIR = re.compile(r"(?P<sep>[?&;]|(?:^|(?<=[\s,(\[{'\"])))(?P<key>[A-Za-z0-9_.\-]+)=(?P<value>[^&;\s'\"<>#)]*)")
#: a password-named pair anywhere, the path of a DVR's URL too ("/user=admin_password=hunter22_channel=1",
#: "?loginpas=..."): its value to the next separator of URL parts (over-masking a trailing "_channel=1" is fine)
_PASSWORD_PAIR = re.compile(r"(?i)(?<![A-Za-z0-9])(?P<key>pass(?:word|wd)?|pwd|psw|loginpas|pw)=(?P<value>[^&;/\s'\"<>#)]*)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*")
#: the passwords learned from URLs, oldest first, and a count of changes (the pattern and labels follow it)
_known_secrets: dict[str, None] = {}
_generation = 0
_pattern_cache: tuple[int, re.Pattern[str] | None] = (0, None)
_lock = threading.Lock()
#: at most this many learned secrets (the oldest go; streams a tool cycled with new passwords grew the set, and
#: each recompile held the lock every log line takes), each at most this long (a longer one stays masked in its
#: URL, where the patterns below find it, not in free text)
MAX_KNOWN_SECRETS = 256
MAX_SECRET_CHARS = 256


def is_secret_key(name: str) -> bool:
    name = unquote(name).lower()
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name in SECRET_NAMES or any(part in name for part in SECRET_PARTS)


def redact_url(url: str) -> str:
    """``url`` with its user info and credential-named query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if is_secret_key(k) else v) for k, v in pairs], safe="*")
    path = _PASSWORD_PAIR.sub(_masked_password, parts.path)
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


def redact_text(text: str, known: bool = True) -> str:
    """Scrub credentials from free text (``known``: the passwords of the URLs opened so far too)."""
    pattern = _known_pattern() if known else None
    if pattern is not None:  # first: the patterns below stop at ':' or ')', which a known secret may hold
        text = pattern.sub(MASK, text)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{MASK}", text)
    text = _PASSWORD_PAIR.sub(_masked_password, text)
    return _QUERY_PAIR.sub(lambda m: f"{m['sep']}{m['key']}={MASK}" if is_secret_key(m["key"]) else m.group(0), text)


def _masked_password(match: re.Match[str]) -> str:
    return f"{match['key']}={MASK}" if match["value"] else match.group(0)


def _known_pattern() -> re.Pattern[str] | None:
    """One pattern for every known secret, longest first (one pass per text however many streams came and
    went), rebuilt when a secret is learned; a short password only as a whole word, or every "a" would go."""
    global _pattern_cache
    with _lock:
        if _pattern_cache[0] != _generation:
            parts = [re.escape(s) if len(s) >= 4 else rf"(?<!\w){re.escape(s)}(?!\w)"
                     for s in sorted(_known_secrets, key=lambda s: (-len(s), s))]
            _pattern_cache = (_generation, re.compile("|".join(parts)) if parts else None)
        return _pattern_cache[1]


def redact_obj(value: Any) -> Any:
    """A JSON-like value (summary, API reply) with :func:`redact_text` applied to every string in it. Keys are
    scrubbed of URL credentials only: they are the reply's own names, and a learned password that is also a word
    ("id", "stream") must not rename "id" or "streams" for every client."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_text(k, known=False) if isinstance(k, str) else k: redact_obj(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_obj(v) for v in value]
    return value


def redacted_label(value: Any) -> str:
    """A Prometheus label value, scrubbed (cached: labels repeat on every frame)."""
    with _lock:
        generation = _generation  # a newly learned secret must reach labels cached before it
    return _cached_label(str(value), generation)


@functools.lru_cache(maxsize=4096)
def _cached_label(value: str, _generation: int) -> str:
    return redact_text(value)


def remember_secrets(url: str) -> None:
    """Note the secrets of ``url`` so that :func:`redact_text` also catches them out of URL context."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    # passwords only: a user name like "cam" is too common a word to scrub everywhere (URLs lose it anyway)
    found = [parts.password, unquote(parts.password)] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if is_secret_key(k)]
    found += [m["value"] for m in _PASSWORD_PAIR.finditer(parts.path)]
    global _generation
    with _lock:
        for secret in (s for s in found if s and len(s) <= MAX_SECRET_CHARS and s not in _known_secrets):
            _known_secrets[secret] = None
            _generation += 1
        while len(_known_secrets) > MAX_KNOWN_SECRETS:
            del _known_secrets[next(iter(_known_secrets))]


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs credentials from every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Add the redacting filter to the root handlers (idempotent), for messages from FFmpeg or Ray."""
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
