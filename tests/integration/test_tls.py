"""TLS with client certificates against a real Mosquitto: what connects, what is refused, in words."""

from __future__ import annotations

import gc
import os
import shutil
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from agent.upstream.tls import (
    SecretError,
    TlsSetupError,
    build_ssl_context,
    diagnose_tls,
    explain_tls_error,
    read_secret,
)
from tests.broker import Broker
from tests.tlsca import Issued, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsBroker:
    """A Mosquitto TLS listener that demands a client certificate signed by the test CA."""

    def __init__(self, pki: Pki, server: Issued) -> None:
        self.broker = Broker()
        # Mosquitto started as root drops to its own user before reading the certificates, so they
        # go where that user can read them (pytest's tmp dirs are private to us).
        tls_dir = self.broker.dir / "tls"
        tls_dir.mkdir()
        os.chmod(self.broker.dir, 0o755)
        for path in (pki.ca, server.cert, server.key):
            shutil.copyfile(path, tls_dir / path.name)
            os.chmod(tls_dir / path.name, 0o644)
        self.broker.extra_conf = "\n".join(
            [
                f"cafile {tls_dir / pki.ca.name}",
                f"certfile {tls_dir / server.cert.name}",
                f"keyfile {tls_dir / server.key.name}",
                "require_certificate true",
                "tls_version tlsv1.2",  # the minimum; TLS 1.3 is negotiated when both sides have it
            ]
        )
        self.port = self.broker.port

    def __enter__(self) -> TlsBroker:
        self.broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.cleanup()


@pytest.fixture
def tls_broker(pki: Pki) -> Iterator[TlsBroker]:
    with TlsBroker(pki, pki.server) as b:
        yield b


async def connect(host: str, port: int, ctx: ssl.SSLContext) -> None:
    async with aiomqtt.Client(host, port, tls_context=ctx, timeout=3, identifier="fg-tls-test") as client:
        await client.publish("fieldgate/test/telemetry", b"{}", qos=1)


def collect_leaked_sockets() -> None:
    """paho-mqtt 2.x does not close its SSL socket when the handshake fails (the fd is reclaimed when
    the object is collected); collect it here, where that is expected, instead of letting the
    ResourceWarning land in a later test under filterwarnings=error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def refused_with(host: str, port: int, ctx: ssl.SSLContext) -> str:
    """Connect, expect failure, and return the explanation the uplink would log."""
    with pytest.raises(aiomqtt.MqttError) as info:
        await connect(host, port, ctx)
    collect_leaked_sockets()
    words = explain_tls_error(info.value, host)
    if "no answer" in words or "timed out" in str(info.value):
        # TLS 1.3: the broker's alert about our certificate comes after the handshake, and aiomqtt
        # only reports a timeout; the uplink then asks diagnose_tls for the real reason.
        diagnosis = await diagnose_tls(host, port, ctx)
        assert diagnosis is not None, "diagnose_tls found nothing wrong with a connection the broker refused"
        words = diagnosis
    return words


async def test_right_client_certificate_connects(pki: Pki, tls_broker: TlsBroker) -> None:
    ctx = build_ssl_context(pki.ca, pki.client.cert, pki.client.key)
    await connect("127.0.0.1", tls_broker.port, ctx)
    await connect("localhost", tls_broker.port, ctx)
    assert await diagnose_tls("localhost", tls_broker.port, ctx) is None


async def test_no_client_certificate_is_refused(pki: Pki, tls_broker: TlsBroker) -> None:
    words = await refused_with("127.0.0.1", tls_broker.port, build_ssl_context(pki.ca, None, None))
    assert "requires a client certificate and we sent none" in words, words


async def test_client_certificate_from_another_ca_is_refused(pki: Pki, tls_broker: TlsBroker) -> None:
    ctx = build_ssl_context(pki.ca, pki.other_client.cert, pki.other_client.key)
    words = await refused_with("127.0.0.1", tls_broker.port, ctx)
    assert "refused our client certificate" in words, words


async def test_expired_client_certificate_is_refused(pki: Pki, tls_broker: TlsBroker) -> None:
    ctx = build_ssl_context(pki.ca, pki.client_expired.cert, pki.client_expired.key)
    words = await refused_with("127.0.0.1", tls_broker.port, ctx)
    assert "refused our client certificate" in words, words
    assert "expired" in words, words


async def test_server_signed_by_unknown_ca_is_refused(pki: Pki, tls_broker: TlsBroker) -> None:
    ctx = build_ssl_context(pki.other_ca, pki.client.cert, pki.client.key)
    words = await refused_with("127.0.0.1", tls_broker.port, ctx)
    assert "not signed by a CA in ca_file" in words, words


async def test_hostname_mismatch_is_refused(pki: Pki) -> None:
    ctx = build_ssl_context(pki.ca, pki.client.cert, pki.client.key)
    with TlsBroker(pki, pki.server_other_name) as b:
        words = await refused_with("localhost", b.port, ctx)
        assert "not valid for the name localhost" in words and "hostname mismatch" in words, words
        # insecure=True skips only the name check: the chain is still verified, so it connects.
        loose = build_ssl_context(pki.ca, pki.client.cert, pki.client.key, insecure=True)
        await connect("localhost", b.port, loose)


async def test_expired_server_certificate_is_refused(pki: Pki) -> None:
    ctx = build_ssl_context(pki.ca, pki.client.cert, pki.client.key)
    with TlsBroker(pki, pki.server_expired) as b:
        words = await refused_with("localhost", b.port, ctx)
        assert "certificate for localhost has expired" in words, words


async def test_plain_mqtt_port_is_not_tls(pki: Pki, broker: Broker) -> None:
    words = await refused_with("127.0.0.1", broker.port, build_ssl_context(pki.ca, None, None))
    assert "does not speak TLS" in words or "closed the connection" in words, words


async def test_nothing_listening(pki: Pki) -> None:
    port = Broker().port  # a free port nobody listens on
    words = await refused_with("127.0.0.1", port, build_ssl_context(pki.ca, None, None))
    assert "connection refused" in words, words


# --- building the context: every bad file is named, with the reason ---------------------------------


def test_key_not_matching_certificate(pki: Pki) -> None:
    with pytest.raises(TlsSetupError, match="does not match cert_file"):
        build_ssl_context(pki.ca, pki.client.cert, pki.other_client.key)


def test_missing_and_unreadable_files(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsSetupError, match=r"ca_file .*nope\.pem: no such file"):
        build_ssl_context(tmp_path / "nope.pem", None, None)
    with pytest.raises(TlsSetupError, match=r"key_file .* no such file"):
        build_ssl_context(pki.ca, pki.client.cert, tmp_path / "missing.key")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    with pytest.raises(TlsSetupError, match="not a PEM file"):
        build_ssl_context(garbage, None, None)
    with pytest.raises(TlsSetupError, match="without cert_file"):
        build_ssl_context(pki.ca, None, pki.client.key)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.key"
        locked.write_bytes(pki.client.key.read_bytes())
        locked.chmod(0)
        with pytest.raises(TlsSetupError, match="permission denied"):
            build_ssl_context(pki.ca, pki.client.cert, locked)


def test_encrypted_key_is_refused_without_prompting(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    with pytest.raises(TlsSetupError, match="passphrase-protected"):
        build_ssl_context(pki.ca, pki.client.cert, encrypted)


def test_context_policy(pki: Pki) -> None:
    ctx = build_ssl_context(pki.ca, pki.client.cert, pki.client.key)
    assert ctx.check_hostname is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    loose = build_ssl_context(pki.ca, None, None, insecure=True)
    assert loose.check_hostname is False
    assert loose.verify_mode == ssl.CERT_REQUIRED


def test_key_from_systemd_credentials(pki: Pki, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "client.key").write_bytes(pki.client.key.read_bytes())
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    ctx = build_ssl_context(pki.ca, pki.client.cert, "%credentials%/client.key", environ=env)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TlsSetupError, match=r"CREDENTIALS_DIRECTORY is not set.*LoadCredential=client\.key"):
        build_ssl_context(pki.ca, pki.client.cert, "%credentials%/client.key", environ={})


def test_secret_errors_do_not_leak(tmp_path: Path) -> None:
    secret = tmp_path / "bad.password"
    secret.write_bytes(b"hunter2\xff\n")
    with pytest.raises(SecretError) as info:
        read_secret(secret)
    assert "hunter2" not in str(info.value) and "not UTF-8" in str(info.value)


def test_read_secret_paths_and_newlines(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt.password").write_text("s3cret\n")
    (tmp_path / "plain.password").write_text("two\nlines\r\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert read_secret("%credentials%/mqtt.password", env) == "s3cret"
    assert read_secret("mqtt.password", env) == "s3cret"  # a bare name under systemd
    assert read_secret(tmp_path / "plain.password", env) == "two\nlines"  # only one newline goes
    (creds / "empty").write_text("\n")
    with pytest.raises(SecretError, match="empty"):
        read_secret("%credentials%/empty", env)
    with pytest.raises(SecretError, match=r"mqtt\.password: \$CREDENTIALS_DIRECTORY is not set"):
        read_secret("%credentials%/mqtt.password", {})
    with pytest.raises(SecretError, match="no such file"):
        read_secret("%credentials%/missing", env)


def test_explanations_from_text_only() -> None:
    # What survives a wrapper that kept only the message (aiomqtt) or paho's log line.
    cases = {
        "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate "
        "required (_ssl.c:2580)": "requires a client certificate",
        "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)": "not signed by a CA the broker",
        "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)": "does not speak TLS",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate is not yet valid": "clock",
    }
    for text, expected in cases.items():
        assert expected in explain_tls_error(aiomqtt.MqttError(text), "broker.example.org"), text
