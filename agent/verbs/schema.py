"""`fieldgate schema`: the JSON Schema of the config file, for editors and CI."""

from __future__ import annotations

import argparse

import orjson

from agent.config.models import FieldgateConfig


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("schema", parents=[common], help="print the JSON Schema of the config file")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    schema = FieldgateConfig.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fieldgate configuration"
    print(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())
    return 0
