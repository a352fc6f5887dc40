"""YAML + profiles -> FieldgateConfig; every error as `FILE:LINE:COL: key.path: message`, all at once."""

from __future__ import annotations

import difflib
import os
import re
import stat
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from agent import registry
from agent.config import modelkit
from agent.errors import ConfigError, FieldgateError
from agent.safefiles import MAX_FILE_BYTES, file_hash, kind_of, present, read_regular

if TYPE_CHECKING:
    from agent.config.models import FieldgateConfig

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    file: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Positions:
    """Where each value (and each mapping key) of the document came from."""

    def __init__(self) -> None:
        self.values: dict[Loc, Mark] = {}
        self.keys: dict[Loc, Mark] = {}

    def find(self, loc: Loc, *, key: bool = False) -> Mark | None:
        """The mark of `loc`, or of its nearest known ancestor."""
        if key and loc in self.keys:
            return self.keys[loc]
        while True:
            if loc in self.values:
                return self.values[loc]
            if not loc:
                return None
            loc = loc[:-1]


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent override is a classic field mistake)."""


# libyaml's parser when PyYAML was built with it: 3 to 10x faster on a large config (100 devices x 100
# points: 1.1 s -> 0.35 s). A file it refuses is parsed again by the pure-Python parser, whose messages are
# the documented ones.
_FastLoader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(yaml, "CSafeLoader", _Loader)


def _mark(node: yaml.Node, file: str) -> Mark:
    return Mark(file, node.start_mark.line + 1, node.start_mark.column + 1)


# --- bounds on what a file may cost (docs/SPEC.md §2, "What a broken or hostile file costs") -------------
# Every file the loader reads is bounded before and while it is parsed, so that a broken or hostile file (a
# remote config is text from the network) gives positioned problems in well under 2 s and 100 MiB, never a
# traceback: see tests/unit/test_loader_hostile.py and bench/bench_config_hostile.py for the figures.
MAX_DEPTH = 64  # nesting levels; a config needs about 8 (devices.NAME.points.NAME.aggregate.functions)
MAX_VALUES = 250_000  # values of a file, aliases expanded
MAX_EVENTS = 200_000  # parser events (values, keys, collection ends); 100 devices x 100 points: 131k
PRESCAN_BYTES = 64 * 1024  # a larger file's events are counted before its nodes are built (about 600 B each)
MAX_ALIAS_VALUES = 20_000  # values reached again through aliases (*name): a billion-laughs bomb stops here
MAX_PURE_PYTHON_BYTES = 256 * 1024  # the pure-Python parser re-reads a refused file only up to this size
# YAML 1.1 §5.1 (as PyYAML's reader): what a YAML stream may hold; C0 controls but TAB/LF/CR, DEL, C1 but NEL.
_NON_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# The tags a config value may have: what JSON has. Timestamps (an unquoted 2024-01-01) are read as their text.
_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_CHAR_NAMES = {0: "NUL", 0x1B: "ESC", 0x7F: "DEL", 0x08: "BS", 0x0C: "FF", 0x0B: "VT"}


class _Walk:
    """One file's node tree -> Python data and positions, within the depth and value budgets."""

    def __init__(self, pos: Positions, file: str, problems: list[str], ctor: yaml.SafeLoader) -> None:
        self.pos = pos
        self.file = file
        self.problems = problems
        self.ctor = ctor
        self.values = 0
        self.seen: set[int] = set()  # the nodes visited: an alias is the same node object, visited again
        self.again = 0
        self.over_budget = False

    def value(self, node: yaml.Node, loc: Loc, depth: int) -> Any:
        if self.over_budget:
            return None
        self.values += 1
        if id(node) in self.seen:
            self.again += 1
        else:
            self.seen.add(id(node))
        if self.values > MAX_VALUES or self.again > MAX_ALIAS_VALUES:
            self.over_budget = True
            self.problems.append(
                f"{_mark(node, self.file)}: {_dotted(loc[:4])}: the document holds more than "
                f"{MAX_VALUES} values, or more than {MAX_ALIAS_VALUES} through aliases (*name); "
                "a config needs far fewer"
            )
            return None
        if depth > MAX_DEPTH and isinstance(node, yaml.CollectionNode):
            self.over_budget = True
            self.problems.append(
                f"{_mark(node, self.file)}: {_dotted(loc[:4])}...: nested more than {MAX_DEPTH} levels deep"
            )
            return None
        return _to_python(node, loc, self, depth)


def _scalar(node: yaml.Node, loc: Loc, walk: _Walk) -> Any:
    tag = node.tag
    if tag == _TIMESTAMP_TAG and isinstance(node.value, str):
        return node.value  # a date is text to every field of the config
    if tag not in _PLAIN_TAGS:
        walk.problems.append(
            f"{_mark(node, walk.file)}: {_dotted(loc)}: YAML tag {tag} is not supported "
            "(a config value is a string, number, boolean or null)"
        )
        return None
    try:
        return walk.ctor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. an int too long to convert
        walk.problems.append(f"{_mark(node, walk.file)}: {_dotted(loc)}: unreadable value: {str(exc)[:200]}")
        return None


def _to_python(node: yaml.Node, loc: Loc, walk: _Walk, depth: int) -> Any:
    pos, file, problems = walk.pos, walk.file, walk.problems
    pos.values[loc] = _mark(node, file)
    if isinstance(node, yaml.CollectionNode) and node.tag not in _COLLECTION_TAGS:
        problems.append(
            f"{_mark(node, file)}: {_dotted(loc)}: YAML tag {node.tag} is not supported "
            "(a config value is a mapping, a list, a string, a number, a boolean or null)"
        )
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                problems.append(
                    f"{_mark(key_node, file)}: {_dotted(loc)}: YAML merge keys (<<) are not supported"
                )
                continue
            # Keys are names: take the text as written, so that a point called `on` (YAML 1.1 would read
            # it as the boolean true) stays the point "on".
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str) or key_node.tag not in (*_PLAIN_TAGS, _TIMESTAMP_TAG):
                problems.append(f"{_mark(key_node, file)}: {_dotted(loc)}: keys must be plain strings")
                continue
            if key in out:
                problems.append(f"{_mark(key_node, file)}: {_dotted((*loc, key))}: duplicate key")
                continue
            pos.keys[(*loc, key)] = _mark(key_node, file)
            out[key] = walk.value(value_node, (*loc, key), depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [walk.value(child, (*loc, i), depth + 1) for i, child in enumerate(node.value)]
    return _scalar(node, loc, walk)


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc) or "(top)"


def load_yaml(
    path: Path, pos: Positions, base: Loc = (), consulted: dict[str, str | None] | None = None
) -> tuple[Any, list[str]]:
    """Parse one YAML file, recording positions under `base`. Returns (data, problems). The digest of the
    bytes read is recorded in `consulted` (path -> digest)."""
    file = str(path)
    try:
        raw = read_regular(path)  # a regular file of at most 1 MiB; a FIFO or a device is refused at once
    except (OSError, ValueError) as exc:
        return None, [f"{file}:1:1: (file): cannot read: {getattr(exc, 'strerror', None) or exc}"]
    if consulted is not None:
        consulted[os.path.abspath(path)] = file_hash(raw)  # the bytes this result comes from
    return parse_yaml(raw, file, pos, base)


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of character `index` of `text`."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _decode(raw: bytes, file: str) -> tuple[str | None, str | None]:
    """The text of a config file (UTF-8, as YAML 1.2 and SPEC §2 say), or a positioned problem."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        return None, f"{file}:1:1: (file): the file is UTF-16 or UTF-32 (byte order mark); save it as UTF-8"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start].decode("utf-8", "replace")
        line, col = _position(before, len(before))
        return None, (
            f"{file}:{line}:{col}: (file): byte 0x{raw[exc.start]:02x} is not UTF-8; save the file as UTF-8"
        )
    bad = _NON_PRINTABLE.search(text)
    if bad is not None:
        line, col = _position(text, bad.start())
        code = ord(bad.group())
        name = _CHAR_NAMES.get(code, "a control character")
        return None, (
            f"{file}:{line}:{col}: (file): character U+{code:04X} ({name}) is not allowed in a YAML file"
        )
    return text, None


def parse_yaml(raw: bytes, file: str, pos: Positions, base: Loc = ()) -> tuple[Any, list[str]]:
    """The bytes of one YAML file -> (data, problems), positions recorded under `base`. Never raises: a file
    that is too large, not UTF-8, too deep or too expanding is a problem at a FILE:LINE:COL."""
    if len(raw) > MAX_FILE_BYTES:
        return None, [
            f"{file}:1:1: (file): {len(raw)} bytes; a config file is at most {MAX_FILE_BYTES // 1024**2} MiB"
        ]
    text, problem = _decode(raw, file)
    if text is None:
        return None, [problem or f"{file}:1:1: (file): unreadable"]
    try:
        if len(raw) > PRESCAN_BYTES:
            count = _count_events(text)
            if count > MAX_EVENTS:
                return None, [
                    f"{file}:1:1: (file): more than {MAX_EVENTS} YAML values, keys and collections; "
                    "a config needs far fewer"
                ]
        node = yaml.compose(text, Loader=_FastLoader)
    except yaml.MarkedYAMLError as fast_exc:
        node, problem = None, _syntax_problem(fast_exc, file)
        nesting = "nesting depth" in problem  # libyaml's bound (1000 levels): the Python parser would recurse
        if _FastLoader is not _Loader and len(raw) <= MAX_PURE_PYTHON_BYTES and not nesting:
            try:  # the pure-Python parser's messages are the documented ones
                node = yaml.compose(text, Loader=_Loader)
            except yaml.MarkedYAMLError as exc:
                problem = _syntax_problem(exc, file)
            except RecursionError:  # a file nested beyond libyaml's bound (1000 levels): its message stays
                pass
        if node is None:
            return None, [problem]
    except yaml.YAMLError as exc:  # no position (the reader checks were done above): never expected
        return None, [f"{file}:1:1: (syntax): {str(exc)[:300]}"]
    except RecursionError:  # the pure-Python parser (no libyaml) on a deeply nested file
        return None, [f"{file}:1:1: (syntax): nested more than {MAX_DEPTH} levels deep"]
    if node is None:
        pos.values.setdefault(base, Mark(file, 1, 1))
        return {}, []
    problems: list[str] = []
    # One constructor for the whole file: making one per scalar took most of the load time (and memory
    # churn) of a large config (100 devices x 100 points: 1.2 s).
    walk = _Walk(pos, file, problems, _Loader(""))
    data = walk.value(node, base, len(base))
    return data, problems


def _count_events(text: str) -> int:
    """The parser events of `text`, up to just past MAX_EVENTS, without building its nodes."""
    count = 0
    for _ in yaml.parse(text, Loader=_FastLoader):
        count += 1
        if count > MAX_EVENTS:
            break
    return count


def _syntax_problem(exc: yaml.MarkedYAMLError, file: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else f"{file}:1:1"
    what = " ".join(str(exc.problem or exc.context).split())
    return f"{where}: (syntax): {what}"


# --- profiles -------------------------------------------------------------------------------------------


def bundled_profiles() -> Path:
    """The profiles shipped in the package (drivers/modbus/profiles/, package data: docs/PROFILES.md)."""
    import importlib.resources  # only for a file that names a profile (about 5 ms of a validation's start)

    return Path(str(importlib.resources.files("drivers.modbus") / "profiles"))


def profile_dirs(config_path: Path) -> list[Path]:
    """Where `profile: NAME` is looked up, first match wins."""
    dirs = [config_path.parent / "profiles"]
    extra = os.environ.get("FIELDGATE_PROFILES")
    if extra:
        dirs.insert(0, Path(extra))
    dirs.append(Path("/etc/fieldgate/profiles"))
    dirs.append(bundled_profiles())
    return dirs


class ProfileNameRefused(FieldgateError):
    """A remote config named a profile by a path: profiles of a remote config are names only."""


def find_profile(
    name: str, config_path: Path, *, remote: bool = False, consulted: dict[str, str | None] | None = None
) -> Path | None:
    """The file of `profile: NAME`. A local config may also name a file (a path, or NAME.yaml); a remote
    config names profiles only, looked up in the profile directories (docs/SECURITY.md). Each candidate
    looked for and absent is recorded in `consulted` (path -> None): creating it later changes the result."""
    absent = {} if consulted is None else consulted
    is_path = "/" in name or name.endswith((".yaml", ".yml"))
    if remote and (is_path or name.startswith(".") or "\x00" in name or "\\" in name):
        raise ProfileNameRefused(
            "a remote config names a profile by its name only (no path, no '.yaml'): "
            "it is looked up in the profile directories"
        )
    if "\x00" in name:
        return None
    if is_path:
        p = Path(name)
        p = p if p.is_absolute() else config_path.parent / p
        if present(p):
            return p  # recorded when read
        absent.setdefault(os.path.abspath(p), None)
        return None
    for d in profile_dirs(config_path):
        candidate = d / f"{name}.yaml"
        if present(candidate):
            return candidate
        absent.setdefault(os.path.abspath(candidate), None)
    return None


def available_profiles(config_path: Path) -> list[str]:
    names: set[str] = set()
    for d in profile_dirs(config_path):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _merge_profiles(
    data: dict[str, Any],
    config_path: Path,
    pos: Positions,
    problems: list[str],
    remote: bool,
    consulted: dict[str, str | None],
) -> None:
    devices = data.get("devices")
    if not isinstance(devices, dict):
        return
    for name, device in devices.items():
        if not isinstance(device, dict) or not isinstance(device.get("profile"), str):
            continue
        prof_name = device["profile"]
        loc: Loc = ("devices", name, "profile")
        try:
            path = find_profile(prof_name, config_path, remote=remote, consulted=consulted)
        except ProfileNameRefused as exc:
            problems.append(f"{pos.find(loc)}: {_dotted(loc)}: {exc}")
            continue
        if path is None:
            hint = difflib.get_close_matches(prof_name, available_profiles(config_path), n=1)
            more = f"; did you mean '{hint[0]}'?" if hint else ""
            problems.append(f"{pos.find(loc)}: {_dotted(loc)}: profile '{prof_name}' not found{more}")
            continue
        refused = _not_regular(path)
        if refused:  # said at the `profile:` key, at once: a FIFO or a device is never opened for reading
            problems.append(f"{pos.find(loc)}: {_dotted(loc)}: {prof_name}: {refused}")
            continue
        merge = registry.profile_merge(registry.device_driver(device))
        if merge is None:  # a driver without profiles: validation reports the `profile` key
            continue
        # Profile values keep their own file positions, under the device's key path.
        prof_pos = Positions()
        prof, errs = load_yaml(path, prof_pos, ("devices", name), consulted)
        problems.extend(errs)
        if prof is None or (errs and not isinstance(prof, dict)):
            continue
        merged = merge(device, prof)  # the driver's merge (drivers/modbus/profile.py)
        for p in merged.problems:
            where = prof_pos.find(("devices", name, *p.loc), key=True) if p.loc else f"{path}:1:1"
            problems.append(f"{where}: {p.label}: {p.message}")
        for src, dst in merged.taken:
            _copy_positions(prof_pos, ("devices", name, *src), pos, ("devices", name, *dst))
        devices[name] = merged.device


def _not_regular(path: Path) -> str | None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # read_regular says why
    if stat.S_ISREG(mode):
        return None
    return f"{kind_of(mode)}, not a regular file: refused"


def _copy_positions(src: Positions, src_loc: Loc, dst: Positions, dst_loc: Loc) -> None:
    n = len(src_loc)
    for table_src, table_dst in ((src.values, dst.values), (src.keys, dst.keys)):
        for loc, mark in table_src.items():
            if loc[:n] == src_loc:
                table_dst[dst_loc + loc[n:]] = mark


# --- validation errors -> positioned lines ---------------------------------------------------------------


def _strip_union_tags(loc: Loc, model: type[BaseModel]) -> tuple[Loc, list[type[BaseModel]]]:
    """Remove the discriminator tags pydantic inserts in error locations, and return the models along the path."""
    clean: list[str | int] = []
    models: list[type[BaseModel]] = []
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if str(part) not in current.model_fields and str(part) in _literal_tags(current):
                continue  # a one-member tagged union collapses to the model: the part is its tag
            models.append(current)
            field = current.model_fields.get(str(part))
            clean.append(part)
            current = field.annotation if field is not None else None
            continue
        origin = typing.get_origin(current)
        if origin is dict:
            clean.append(part)
            current = typing.get_args(current)[1]
            continue
        if origin is list:
            clean.append(part)
            current = typing.get_args(current)[0]
            continue
        members = _union_members(current)
        if members:
            tagged = _tagged_member(members, str(part))
            if tagged is not None:
                current = tagged  # this part is a tag, not a key of the document
                continue
        clean.append(part)
        current = None
    return tuple(clean), models


def _literal_tags(model: type[BaseModel]) -> set[str]:
    tags: set[str] = set()
    for name in ("driver", "type"):
        field = model.model_fields.get(name)
        if field is not None and typing.get_origin(field.annotation) is typing.Literal:
            tags.update(str(a) for a in typing.get_args(field.annotation))
    return tags


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        args = typing.get_args(tp)
        meta = args[1:]
        tp = args[0]
        if typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType):
            return _AnnotatedUnion(tp, meta)
    return tp


class _AnnotatedUnion:
    def __init__(self, union: Any, meta: tuple[Any, ...]) -> None:
        self.union = union
        self.meta = meta


def _union_members(tp: Any) -> list[Any]:
    if isinstance(tp, _AnnotatedUnion):
        tp = tp.union
    if typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType):
        return list(typing.get_args(tp))
    return []


def _tagged_member(members: list[Any], tag: str) -> Any:
    for m in members:
        if typing.get_origin(m) is typing.Annotated:
            base, *meta = typing.get_args(m)
            for item in meta:
                if getattr(item, "tag", None) == tag:
                    return base
        elif isinstance(m, type) and m.__name__ == tag:
            return m
    return None


def _model_at(loc: Loc, root: type[BaseModel], data: Any) -> type[BaseModel] | None:
    """The model class that holds the mapping at `loc` (for 'did you mean'); unions resolved by the data's tag."""
    current: Any = root
    node = data
    for part in (*loc, None):
        current = _resolve_union(_unwrap(current), node)
        if part is None:
            break
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
        else:
            return None
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _resolve_union(tp: Any, node: Any) -> Any:
    members = _union_members(tp)
    if not members:
        return tp
    concrete = [m for m in members if m is not type(None)]
    if len(concrete) == 1:
        return _unwrap(concrete[0])
    if isinstance(node, dict):
        for key, default in (("driver", "modbus"), ("type", "")):
            tagged = _tagged_member(concrete, str(node.get(key, default)))
            if tagged is not None:
                return _unwrap(tagged)
    return tp


def _message(err: Any, loc: Loc, data: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tag = str(ctx.get("tag", ""))
        expected = str(ctx.get("expected_tags", ""))
        names = [t.strip().strip("'") for t in expected.split(",")]
        hint = difflib.get_close_matches(tag, names, n=1)
        more = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"unknown '{tag}' (expected one of {expected}){more}"
    if kind == "union_tag_not_found":
        return "missing the key that says which kind this is (e.g. 'type' for a bus)"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def format_validation_errors(exc: ValidationError, pos: Positions, data: Any) -> list[str]:
    from agent.config.models import FieldgateConfig

    lines = []
    for err in exc.errors():
        loc, _models = _strip_union_tags(tuple(err["loc"]), FieldgateConfig)
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            parent = _model_at(loc[:-1], FieldgateConfig, data)
            hint = difflib.get_close_matches(key, list(parent.model_fields), n=1) if parent else []
            more = f"; did you mean '{hint[0]}'?" if hint else ""
            lines.append(f"{pos.find(loc, key=True)}: {_dotted(loc)}: unknown key{more}")
            continue
        mark = pos.find(loc, key=err["type"] == "missing")
        lines.append(f"{mark}: {_dotted(loc)}: {_message(err, loc, data)}")
    return sorted(lines, key=_line_order)


def _line_order(line: str) -> tuple[str, int, int]:
    parts = line.split(":", 3)
    try:
        return parts[0], int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return line, 0, 0


@dataclass(frozen=True, slots=True)
class Loaded:
    """A validated config and every file its result depends on: (absolute path, sha256 of the bytes read,
    or None for a profile candidate looked for and absent), in the order consulted. With
    $FIELDGATE_PROFILES, agent/config/validate.py keys the snapshot of the last validated config on them."""

    config: FieldgateConfig
    consulted: list[tuple[str, str | None]]


def load_config(path: Path, *, remote: bool = False) -> FieldgateConfig:
    """Load and validate a config file; raise ConfigError with every problem, positioned. `remote`: the
    file came over the network (profiles by name only, from the profile directories)."""
    return load(path, remote=remote).config


def load(path: Path, *, remote: bool = False, only_named_drivers: bool = False) -> Loaded:
    """`load_config`, with the files the result depends on. `only_named_drivers`: for a process that validates
    this one file (agent/config/validate.py), the config models are built with the models of the drivers
    its devices name only (modelkit.only_drivers; the same result, less to import and build)."""
    consulted: dict[str, str | None] = {}
    pos = Positions()
    data, problems = load_yaml(path, pos, (), consulted)
    if data is None or problems:
        raise ConfigError(problems or [f"{path}:1:1: (file): unreadable"])
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{pos.find(())}: (top): the config file must be a mapping (gateway, upstream, ...)"]
        )
    _merge_profiles(data, path, pos, problems, remote, consulted)
    if only_named_drivers:
        named = registry.drivers_named(data.get("devices", {}))
        if named is not None:
            modelkit.only_drivers(named)
    from agent.config.models import FieldgateConfig  # here: after the choice of its device union

    try:
        config = FieldgateConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(format_validation_errors(exc, pos, data))
        raise ConfigError(_dedupe(problems)) from None
    for loc, message in config.problems():
        problems.append(f"{pos.find(loc)}: {_dotted(loc)}: {message}")
    if problems:
        raise ConfigError(_dedupe(problems))
    return Loaded(config, list(consulted.items()))


def _dedupe(lines: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in lines if not (x in seen or seen.add(x))]  # type: ignore[func-returns-value]
