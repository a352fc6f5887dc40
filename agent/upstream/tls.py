"""TLS for the uplink: the client SSL context, TLS failures explained in words, and secrets from files.

Paths given to `build_ssl_context` and `read_secret` may name systemd credentials: `%credentials%/NAME`
(or a bare `NAME` without a slash, when `$CREDENTIALS_DIRECTORY` is set) resolves to
`$CREDENTIALS_DIRECTORY/NAME`, where systemd put the file named by `LoadCredential=NAME:...`. That way the
private key and the password stay root-only on disk and only this service's copy is readable by it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path

from agent.errors import FieldgateError, UpstreamError
from agent.safefiles import read_regular

CREDENTIALS_PREFIX = "%credentials%/"


class TlsSetupError(UpstreamError):
    """The TLS material cannot be used (missing, unreadable, not PEM, key not matching the certificate)."""


class SecretError(FieldgateError):
    """A secret file cannot be read; the message names the file, never its content."""


def credential_path(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Path:
    """Resolve `%credentials%/NAME` (or a bare `NAME` under systemd) against `$CREDENTIALS_DIRECTORY`."""
    env = os.environ if environ is None else environ
    text = os.fspath(path)
    creds = env.get("CREDENTIALS_DIRECTORY", "")
    if text.startswith(CREDENTIALS_PREFIX):
        name = text[len(CREDENTIALS_PREFIX) :]
        if not name or "/" in name:
            raise SecretError(f"{text}: a credential is named %credentials%/NAME, NAME without '/'")
        if not creds:
            raise SecretError(
                f"{text}: $CREDENTIALS_DIRECTORY is not set; this path works only when systemd starts "
                f"the service with LoadCredential={name}:/path/to/file"
            )
        return Path(creds) / name
    if creds and "/" not in text and text not in ("", ".", ".."):
        return Path(creds) / text
    return Path(text)


def read_secret(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> str:
    """The content of a secret file minus one trailing newline. Errors name the file, never the secret."""
    resolved = credential_path(path, environ)
    shown = os.fspath(path)
    where = shown if os.fspath(resolved) == shown else f"{shown} ({resolved})"
    try:
        data = read_regular(resolved, 64 << 10)  # a regular file: a FIFO or /dev/zero is refused at once
    except FileNotFoundError:
        raise SecretError(f"{where}: no such file") from None
    except PermissionError:
        raise SecretError(f"{where}: permission denied{_permission_hint()}") from None
    except IsADirectoryError:
        raise SecretError(f"{where}: is a directory, not a file") from None
    except OSError as exc:
        raise SecretError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{where}: not UTF-8 text") from None  # the exception would quote a byte
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise SecretError(f"{where}: the file is empty")
    return text


def _permission_hint() -> str:
    return (
        " (the service runs as an unprivileged user: keep secrets root-only under /etc/fieldgate/credentials "
        "and name them %credentials%/NAME, see docs/OPERATIONS.md)"
    )


def _check_readable(what: str, path: Path, shown: str) -> None:
    try:
        head = read_regular(path)[: 1 << 16]  # a regular file of at most 1 MiB
    except FileNotFoundError:
        raise TlsSetupError(f"{what} {shown}: no such file") from None
    except PermissionError:
        raise TlsSetupError(f"{what} {shown}: permission denied{_permission_hint()}") from None
    except IsADirectoryError:
        raise TlsSetupError(f"{what} {shown}: is a directory, not a file") from None
    except OSError as exc:
        raise TlsSetupError(f"{what} {shown}: cannot read: {exc.strerror}") from None
    if b"-----BEGIN " not in head:
        raise TlsSetupError(f"{what} {shown}: not a PEM file (expected a '-----BEGIN ...' line)")


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase,
    # which hangs a daemon; returning nothing makes it fail instead, and we say why.
    return ""


def build_ssl_context(
    ca_file: str | os.PathLike[str] | None,
    cert_file: str | os.PathLike[str] | None,
    key_file: str | os.PathLike[str] | None,
    insecure: bool = False,
    environ: Mapping[str, str] | None = None,
) -> ssl.SSLContext:
    """A client context: TLS >= 1.2, the broker verified against `ca_file` (system CAs when None),
    its hostname checked unless `insecure`, and our certificate presented when `cert_file` is given
    (`key_file` None: the key is in `cert_file`). Raises TlsSetupError with the file and the reason."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        # Only the name check goes: the chain is still verified against ca_file.
        ctx.check_hostname = False
    try:
        ca = credential_path(ca_file, environ) if ca_file is not None else None
        cert = credential_path(cert_file, environ) if cert_file is not None else None
        key = credential_path(key_file, environ) if key_file is not None else None
    except SecretError as exc:
        raise TlsSetupError(str(exc)) from None

    if ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _check_readable("ca_file", ca, str(ca_file))
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            reason = exc.reason or exc
            raise TlsSetupError(f"ca_file {ca_file}: no usable CA certificate in it ({reason})") from None

    if cert is None:
        if key is not None:
            raise TlsSetupError(f"key_file {key_file} is set without cert_file")
        return ctx
    cert_shown = str(cert_file)
    key_shown = str(key_file) if key_file is not None else cert_shown
    _check_readable("cert_file", cert, cert_shown)
    if key is not None:
        _check_readable("key_file", key, key_shown)
    key_head = (key or cert).read_bytes()[: 1 << 16]
    if b"ENCRYPTED" in key_head:
        raise TlsSetupError(
            f"key_file {key_shown}: the private key is passphrase-protected; fieldgate needs it unencrypted "
            "(protect it with file permissions and LoadCredential= instead)"
        )
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key, password=_no_passphrase)
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".lower()
        if "key_values_mismatch" in text or "key values mismatch" in text:
            raise TlsSetupError(
                f"key_file {key_shown} does not match cert_file {cert_shown}: "
                "the private key belongs to another certificate"
            ) from None
        if key is None:
            raise TlsSetupError(
                f"cert_file {cert_shown}: no private key found (set key_file, or put the key in that file)"
            ) from None
        raise TlsSetupError(
            f"cert_file {cert_shown} / key_file {key_shown}: cannot load the certificate and key "
            f"({exc.reason or exc})"
        ) from None
    return ctx


# What an OpenSSL reason or verify message means for an operator. The broker side first, then ours.
_VERIFY_CODES = {
    9: "not_yet_valid",
    10: "expired",
    18: "unknown_ca",
    19: "unknown_ca",
    20: "unknown_ca",
    2: "unknown_ca",
    21: "unknown_ca",
    62: "hostname",
    64: "hostname",
}

_PATTERNS: tuple[tuple[str, str], ...] = (
    # Alerts the broker sent about our client certificate (reported by OpenSSL as "... alert ...").
    ("alert certificate required", "client_cert_required"),
    ("alert unknown ca", "client_cert_unknown_ca"),
    ("alert bad certificate", "client_cert_bad"),
    ("alert certificate expired", "client_cert_expired"),
    ("alert certificate revoked", "client_cert_revoked"),
    ("alert certificate unknown", "client_cert_bad"),
    ("alert unsupported certificate", "client_cert_bad"),
    ("alert access denied", "client_cert_bad"),
    ("alert protocol version", "protocol_version"),
    ("alert handshake failure", "handshake_failure"),
    # Our verification of the broker's certificate.
    ("certificate has expired", "expired"),
    ("certificate is not yet valid", "not_yet_valid"),
    ("hostname mismatch", "hostname"),
    ("ip address mismatch", "hostname"),
    ("doesn't match", "hostname"),
    ("unable to get local issuer certificate", "unknown_ca"),
    ("unable to get issuer certificate", "unknown_ca"),
    ("self-signed certificate", "unknown_ca"),
    ("self signed certificate", "unknown_ca"),
    ("unable to verify the first certificate", "unknown_ca"),
    # Not TLS on the other side, or not the TLS we accept.
    ("wrong version number", "not_tls"),
    ("unsupported protocol", "protocol_version"),
    ("packet length too long", "not_tls"),
    ("record layer failure", "not_tls"),
    ("no protocols available", "protocol_version"),
    ("eof occurred in violation of protocol", "closed"),
    ("unexpected eof", "closed"),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                stack.append(nxt)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)


def _classify(exc: BaseException) -> tuple[str | None, BaseException]:
    chain = list(_chain(exc))
    for e in chain:
        code = getattr(e, "verify_code", None)
        if isinstance(e, ssl.SSLCertVerificationError) and isinstance(code, int) and code in _VERIFY_CODES:
            return _VERIFY_CODES[code], e
    for e in chain:
        text = f"{getattr(e, 'reason', '') or ''} {getattr(e, 'verify_message', '') or ''} {e}".lower()
        for needle, kind in _PATTERNS:
            if needle.replace(" ", "_") in text or needle in text:
                return kind, e
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "refused", e
        if isinstance(e, ConnectionResetError | BrokenPipeError):
            return "closed", e
        if isinstance(e, TimeoutError):
            return "timeout", e
        if isinstance(e, OSError) and e.__class__.__name__ == "gaierror":
            return "dns", e
    return None, exc


def explain_tls_error(exc: BaseException, host: str) -> str:
    """One sentence saying, in words, why a TLS connection to `host` failed, and what to check.

    Works on the ssl exception itself, on anything that chains it, and on a wrapper that kept only
    its text (aiomqtt's MqttError does). The original reason follows in brackets for the expert.
    """
    kind, found = _classify(exc)
    detail = str(found) or found.__class__.__name__
    messages = {
        "expired": f"the broker's certificate for {host} has expired (or this gateway's clock is wrong: "
        "check NTP with `timedatectl`)",
        "not_yet_valid": f"the broker's certificate for {host} is not valid yet: this gateway's clock is "
        "probably wrong (check NTP with `timedatectl`)",
        "unknown_ca": f"the broker's certificate for {host} is not signed by a CA in ca_file "
        "(unknown CA: wrong ca_file, or a missing intermediate certificate on the broker)",
        "hostname": f"the broker's certificate is not valid for the name {host} (hostname mismatch: use "
        "the name in its subjectAltName in upstream.mqtt.url)",
        "client_cert_required": f"the broker {host} requires a client certificate and we sent none "
        "(set upstream.mqtt.tls.cert_file and key_file)",
        "client_cert_unknown_ca": f"the broker {host} refused our client certificate: it is not signed by "
        "a CA the broker trusts (unknown CA)",
        "client_cert_bad": f"the broker {host} refused our client certificate (bad certificate: wrong CA, "
        "wrong usage, or revoked)",
        "client_cert_expired": f"the broker {host} refused our client certificate: it has expired "
        "(renew cert_file, then `systemctl reload fieldgate`)",
        "client_cert_revoked": f"the broker {host} refused our client certificate: it has been revoked",
        "protocol_version": f"no TLS version in common with {host} (fieldgate requires TLS 1.2 or newer)",
        "handshake_failure": f"the TLS handshake with {host} failed: no cipher or parameters in common, "
        "or the broker rejected our certificate",
        "not_tls": f"{host} does not speak TLS on this port (mqtts:// pointed at a plain MQTT port?)",
        "closed": f"the broker {host} closed the connection during TLS setup (often: it rejected our client "
        "certificate, or sent none of its own)",
        "refused": f"connection refused by {host}: nothing listens on that port",
        "timeout": f"no answer from {host} in time (network, firewall, or wrong port)",
        "dns": f"cannot resolve the name {host} (DNS)",
    }
    sentence = messages.get(kind or "", f"connection to {host} failed")
    return f"{sentence} [{detail}]"


def _probe(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> str | None:
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        try:
            # The broker waits for our MQTT CONNECT, so silence means TLS is accepted; an alert
            # about our certificate (TLS 1.3 sends it after the handshake) arrives within this read.
            data = tls.recv(1)
        except TimeoutError:
            return None
        if data == b"":
            raise ConnectionResetError("the broker closed the connection right after the TLS handshake")
    return None


async def diagnose_tls(host: str, port: int, ctx: ssl.SSLContext, wait_s: float = 2.0) -> str | None:
    """Open one TLS connection to the broker to say why MQTT over TLS fails; None if TLS itself is fine.

    Needed because with TLS 1.3 the broker refuses our client certificate *after* the handshake, and
    aiomqtt reports that as a bare "Operation timed out" (paho only logs the alert). The uplink calls
    this after a failed connect; it contacts only the configured broker.
    """
    try:
        return await asyncio.to_thread(_probe, host, port, ctx, wait_s)
    except (OSError, ssl.SSLError) as exc:
        return explain_tls_error(exc, host)
