"""Broken and hostile config files (issue 17): the bytes, and the line each must give.

Shared by tests/unit/test_loader_hostile.py (positioned problem, bounded memory, never a traceback) and
bench/bench_config_hostile.py (the time and memory `fieldgate check` takes on each).
"""

from __future__ import annotations

from collections.abc import Callable

VALID = b'gateway: {id: gw-1}\nupstream: {mqtt: {url: "mqtt://127.0.0.1:1883"}}\n'


def _alias_bomb() -> bytes:
    """Billion laughs: 9 levels of 9 aliases, 9**9 (387 million) strings once expanded."""
    lines = ['lol: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join(f"*{prev}" for _ in range(9)) + "]")
        prev = name
    return ("\n".join(lines) + "\n").encode()


def _alias_bomb_mappings() -> bytes:
    """The same with mappings, placed where a config has them (devices)."""
    lines = ["x0: &x0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9}"]
    for i in range(1, 9):
        lines.append(f"x{i}: &x{i} {{" + ", ".join(f"k{j}: *x{i - 1}" for j in range(9)) + "}")
    return ("\n".join(lines) + "\n" + VALID.decode() + "devices: {d: {bus: b, points: *x8}}\n").encode()


# name -> (bytes, the start of the expected problem after "FILE:")
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "1:1: gateway: required key is missing"),
    "only-a-comment": (lambda: b"# nothing yet\n", "1:1: gateway: required key is missing"),
    "not-utf8": (lambda: VALID + b"name: \xe9t\xe9\n", "3:7: (file): byte 0xe9 is not UTF-8"),
    "utf16-bom": (lambda: "gateway: {id: gw-1}\n".encode("utf-16"), "1:1: (file): the file is UTF-16"),
    "utf32-bom": (lambda: "gateway: {id: gw-1}\n".encode("utf-32"), "1:1: (file): the file is UTF-16"),
    "nul": (lambda: VALID + b"devices: {\x00}\n", "3:11: (file): character U+0000 (NUL)"),
    "esc": (lambda: b"gateway: {id: gw-1, name: \x1b[2J}\n", "1:27: (file): character U+001B (ESC)"),
    "c1-control": (lambda: "gateway: {name: \x9b}\n".encode(), "1:17: (file): character U+009B"),
    "deep-flow-10000": (
        lambda: b"gateway: " + b"[" * 10_000,
        "1:1009: (syntax): exceeded maximum nesting depth",
    ),
    "deep-flow-1000000": (lambda: b"[" * 1_000_000, "1:1001: (syntax): exceeded maximum nesting depth"),
    "deep-flow-900": (lambda: b"a: " + b"[" * 900 + b"]" * 900, "1:"),
    "deep-block": (
        lambda: "".join(f"{' ' * i}k{i}:\n" for i in range(1200)).encode(),  # 0.73 MB: under the size bound
        "1000:1004: (syntax): exceeded",
    ),
    "deep-compact-seq": (lambda: b"- " * 5000 + b"x\n", "1:"),
    "alias-bomb": (_alias_bomb, "1:"),
    "alias-bomb-mappings": (_alias_bomb_mappings, ""),
    "string-20MB": (
        lambda: b'gateway: {id: "' + b"x" * 20_000_000 + b'"}\n',
        "1:1: (file): cannot read: larger than 1 MiB",
    ),
    "python-tag": (lambda: VALID + b"x: !!python/object/apply:os.system [true]\n", "3:4: x: YAML tag"),
    "binary-tag": (lambda: VALID + b"x: !!binary aGVsbG8=\n", "3:4: x: YAML tag"),
    "set-tag": (lambda: VALID + b"x: !!set {a, b}\n", "3:4: x: YAML tag"),
    "long-int": (lambda: VALID + b"x: " + b"9" * 5000 + b"\n", "3:4: x: unreadable value"),
    "two-documents": (lambda: VALID + b"---\n" + VALID, "3:1: (syntax):"),
    "a-list": (lambda: b"- a\n- b\n", "1:1: (top): the config file must be a mapping"),
    "a-scalar": (lambda: b"hello\n", "1:1: (top): the config file must be a mapping"),
    "complex-key": (lambda: VALID + b"? [a, b]\n: 1\n", "3:3: (top): keys must be plain strings"),
    "many-values": (lambda: b"x: [" + b"1," * 300_000 + b"1]\n", "1:1: (file): more than 200000 YAML values"),
    "many-values-small": (lambda: b"x: [" + b"1," * 32_000 + b"1]\n", "1:1: gateway: required key"),
}
