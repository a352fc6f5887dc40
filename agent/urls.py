"""URLs of the config: what `check` accepts, and how any URL is shown (status, health, logs).

A URL never carries credentials in fieldgate: `mqtt://user:secret@host` would send "user:secret@host" to DNS
(the client takes the host from the URL) and show the password on the unauthenticated status page and in the
log. The config refuses userinfo in every URL field (`url_problem`) and gives the way that works instead
(`username` + `password_file`, `token_file`); whatever renders a URL goes through `redact_url` anyway, which
also hides query values (a token a context broker may take as `?access_token=...`).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"


def redact_url(url: str) -> str:
    """`url` as it may be shown: userinfo replaced by ***, each query value by ***; never raises."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    url = f"{scheme}{sep}{authority}{slash}{tail}"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[': show the scheme only
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://{REDACTED}" if sep else REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        query = "&".join(
            f"{item.partition('=')[0]}={REDACTED}" if "=" in item else REDACTED for item in query.split("&")
        )
    fragment = REDACTED if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def url_problem(url: str, schemes: tuple[str, ...], credentials: str) -> str | None:
    """Why `url` cannot be used (None when it can): scheme, host, port 1-65535, no userinfo.
    `credentials` says where credentials go instead, e.g. "upstream.mqtt.username and password_file"."""
    if any(ord(c) < 0x21 or ord(c) >= 0x7F for c in url):
        return "a URL is printable ASCII: no spaces, control characters or accents (write a host in punycode)"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in schemes:
        return f"the scheme must be {' or '.join(s + '://' for s in schemes)}"
    if "@" in parts.netloc:
        return (
            f"credentials in the URL ({redact_url(url)}) are not supported: they would be sent to DNS as "
            f"part of the host name and shown in the status page and the log; use {credentials}"
        )
    try:
        port = parts.port
    except ValueError:
        return "the port must be a number from 1 to 65535"
    if port == 0:
        return "the port must be a number from 1 to 65535"
    if not parts.hostname:
        return "the URL has no host"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "the URL cannot have a query (?...) or fragment (#...): it is the server's base URL"
    return None
