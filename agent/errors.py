"""The exception tree of fieldgate, and what each error means to its handler.

Every exception fieldgate raises on purpose is a FieldgateError (tests/unit/test_errors.py checks every
module of agent/ and drivers/). The classes below the line live beside the code that raises them.

FieldgateError
├── ConfigError            bad configuration: reported as FILE:LINE:COL, nothing applied
├── DeviceError            one device's trouble: counted in its health, backed off, never fatal
│   ├── DeviceUnreachable      no answer, port missing, connection refused, timeout
│   │   └── NoAnswer, ConnectionLost  our Modbus TCP client's silence, its closed link (drivers/modbus/tcpclient.py)
│   ├── DeviceProtocolError    an answer we cannot use: CRC, checksum, exception response
│   │   ├── GarbledAnswer, WrongAnswer  no Modbus TCP frame; a frame of another unit or request (tcpclient.py)
│   │   └── ModbusExceptionResponse   the slave answered with a Modbus exception (drivers/modbus/tcpclient.py)
│   └── PointError             one point failed (e.g. illegal address); the others are kept
├── WriteRefused           a write/command rejected before touching the device (not writable, range, type)
├── DecodeError            a frame/advertisement that a codec rejects (length, checksum, version, key)
├── StoreError             the local buffer failed (disk full, I/O): logged loudly, polling goes on
│   └── _CorruptBuffer         the buffer file is not a usable database: moved aside, a new one made (store.py)
└── UpstreamError          the MQTT link failed: reconnect with backoff, data stays buffered
    ├── TlsSetupError          the TLS context cannot be built from the config's files (upstream/tls.py)
    ├── PrimaryHostOffline     the Sparkplug primary host said offline: the session ends, a new one waits
    ├── PreferredBrokerBack    a preferred broker answers again: the session on another one ends (upstream/mqtt.py)
    └── ContextBrokerError     the NGSI-LD broker's answer means: try again later (upstream/ngsild_http.py)
────────
├── SecretError            a secret file cannot be read or is empty (upstream/tls.py)
├── NotRegularFile         also an OSError: a FIFO, a device or an oversized file is never read (safefiles.py)
├── ProfileNameRefused     a remote config named a profile by a path (config/loader.py)
├── MigrationError         a config file cannot be migrated to this version (config/migrate.py)
├── ModelKitChosenLate     a process chose its config model kit after building models (config/modelkit.py)
├── CommandRefused         a platform command refused before execution: its result's error (control/commands.py)
├── PushRefused            a pushed config or upgrade command refused before anything changed (control/remoteconfig.py)
├── HttpRequestFailed      the local API answers with an error status (control/localapi.py)
├── FleetSetupError        `fieldgate fleet`: bad stages, missing files, unreadable key; nothing pushed (control/fleet.py)
└── BufferVerbFailed       `fieldgate buffer` stops with exit 1, saying why (verbs/buffer.py)
"""

from __future__ import annotations


class FieldgateError(Exception):
    """Base of every error fieldgate raises on purpose."""


class ConfigError(FieldgateError):
    """The configuration is invalid; `problems` holds every `FILE:LINE:COL: key.path: message` line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class DeviceError(FieldgateError):
    """A device-level failure; the scheduler counts it and backs the device off."""


class DeviceUnreachable(DeviceError):
    """No answer: timeout, connection refused, serial port missing."""


class DeviceProtocolError(DeviceError):
    """The device answered something unusable: bad CRC/checksum, exception response, garbage."""


class PointError(DeviceError):
    """A single point could not be read; the device's other points are still good."""

    def __init__(self, point: str, message: str) -> None:
        super().__init__(f"{point}: {message}")
        self.point = point


class WriteRefused(FieldgateError):
    """A write was refused before reaching the device (unknown/non-writable point, type, min/max)."""


class DecodeError(FieldgateError):
    """A codec rejected its input; the message says why (checksum, length, version, key)."""


class StoreError(FieldgateError):
    """The local buffer failed (disk full, I/O error, corruption)."""


class UpstreamError(FieldgateError):
    """The upstream link failed (refused, TLS, lost)."""
