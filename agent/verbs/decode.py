"""`fieldgate decode CODEC HEX`: decode one captured frame or advertisement with the driver's own codec."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

import orjson

from agent.errors import DecodeError

# codec name -> "module:function(data: bytes, options: dict[str, str]) -> dict[str, Value]"
CODECS = {
    "tic": "drivers.tic.codec:decode_cli",
    "sds011": "drivers.sds011.codec:decode_cli",
    "pms5003": "drivers.pms5003.codec:decode_cli",
    "mhz19": "drivers.mhz19.codec:decode_cli",
    "mbus": "drivers.mbus.codec:decode_cli",
    "bthome": "drivers.ble.bthome:decode_cli",
    "ruuvi": "drivers.ble.ruuvi:decode_cli",
    "pvvx": "drivers.ble.xiaomi:decode_cli_pvvx",
    "atc": "drivers.ble.xiaomi:decode_cli_atc",
}


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("decode", parents=[common], help="decode a captured frame or advertisement (hex)")
    p.add_argument("codec", choices=sorted(CODECS))
    p.add_argument("hex", nargs="+", help="the bytes in hex (spaces and ':' allowed)")
    p.add_argument("--key", help="BTHome bindkey (32 hex digits), for encrypted adverts")
    p.add_argument("--address", help="the advertiser's MAC (encrypted BTHome)")
    p.add_argument("--mode", choices=["historic", "standard"], help="TIC mode")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    text = "".join(args.hex).replace(":", "").replace(" ", "").replace("-", "")
    try:
        data = bytes.fromhex(text)
    except ValueError:
        print(f"decode: not hexadecimal: {text[:40]}", file=sys.stderr)
        return 1
    module, _, func = CODECS[args.codec].partition(":")
    decode = getattr(importlib.import_module(module), func)
    options = {k: v for k, v in (("key", args.key), ("address", args.address), ("mode", args.mode)) if v}
    try:
        values = decode(data, options)
    except DecodeError as exc:
        if args.json:
            print(orjson.dumps({"ok": False, "error": str(exc)}).decode())
        else:
            print(f"rejected: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a codec bug: said as one, with what a bug report needs
        message = f"codec bug in {args.codec} (please report it with the hex): {type(exc).__name__}: {exc}"
        if args.json:
            print(orjson.dumps({"ok": False, "error": message}).decode())
        else:
            print(message, file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
        return 2
    if args.json:
        print(orjson.dumps(values).decode())
    else:
        width = max((len(k) for k in values), default=0)
        for k, v in values.items():
            print(f"{k:<{width}}  {v}")
    return 0
