"""`fieldgate check` never tracebacks (issue 17): broken and hostile files give positioned problems.

Every file of tests/hostile_configs.py (not UTF-8, UTF-16, NUL/ESC bytes, 10000 levels of '[', billion
laughs, a 20 MB string...) gives `FILE:LINE:COL: ...` lines and exit 1, within structural bounds that keep it
under 2 s and 100 MiB (file size, nesting depth, parser events, values reached through aliases; the figures
are bench/bench_config_hostile.py's). Hypothesis fuzzes the loader with random bytes and random YAML.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import loader
from agent.cli import main as cli
from agent.errors import ConfigError
from agent.loader import Positions, load_config, parse_yaml
from tests.hostile_configs import HOSTILE, VALID

REPO = Path(__file__).resolve().parents[2]
POSITIONED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): \S")
MEMORY_BOUND = 100 * 1024 * 1024  # bytes allocated at the peak of one load (tracemalloc)


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return err.value.problems


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_gives_positioned_problems_within_bounded_memory(name: str, tmp_path: Path) -> None:
    make, expected = HOSTILE[name]
    path = tmp_path / "fieldgate.yaml"
    path.write_bytes(make())
    tracemalloc.start()
    try:
        problems = _problems(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problems
    for line in problems:
        assert POSITIONED.match(line) and line.startswith(f"{path}:"), line
        assert "None:" not in line
    assert problems[0].startswith(f"{path}:{expected}"), problems[0]
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.1f} MiB"


def test_alias_expansion_stops_at_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Billion laughs is refused by counting, not by running out of time or memory: the walk stops at the
    first value past MAX_ALIAS_VALUES reached again through an alias."""
    visits: list[int] = []
    original = loader._to_python

    def counting(node: Any, loc: Any, walk: Any, depth: int) -> Any:
        visits.append(1)
        return original(node, loc, walk, depth)

    monkeypatch.setattr(loader, "_to_python", counting)
    path = tmp_path / "fieldgate.yaml"
    path.write_bytes(HOSTILE["alias-bomb"][0]())
    problems = _problems(path)
    assert f"more than {loader.MAX_ALIAS_VALUES} through aliases" in problems[0]
    assert len(visits) <= loader.MAX_ALIAS_VALUES + 200  # the file's own ~100 values, then the budget


def test_aliases_a_config_may_use_still_work(tmp_path: Path) -> None:
    path = tmp_path / "fieldgate.yaml"
    path.write_text(
        VALID.decode()
        + "buses: {lan: {type: modbus-tcp, host: 127.0.0.1}}\n"
        + "devices:\n"
        + "  a: {bus: lan, points: &pts {v: {address: 0}, w: {address: 1, type: float32}}}\n"
        + "  b: {bus: lan, points: *pts}\n"
    )
    config = load_config(path)
    assert config.devices["a"].points == config.devices["b"].points
    assert set(config.devices["b"].points) == {"v", "w"}


def test_nesting_bound(tmp_path: Path) -> None:
    path = tmp_path / "fieldgate.yaml"
    deep = "[" * (loader.MAX_DEPTH + 5) + "]" * (loader.MAX_DEPTH + 5)
    path.write_text(VALID.decode() + f"x: {deep}\n")
    assert f"nested more than {loader.MAX_DEPTH} levels deep" in _problems(path)[0]


def test_file_size_bound(tmp_path: Path) -> None:
    """A file is refused at its size before it is read (agent.safefiles: 1 MiB, one bound for every file)."""
    path = tmp_path / "fieldgate.yaml"
    path.write_bytes(VALID + b"#" * loader.MAX_FILE_BYTES)
    assert _problems(path) == [f"{path}:1:1: (file): cannot read: larger than 1 MiB: refused"]


def test_text_size_bound() -> None:
    """Bytes that come from elsewhere than a file (a remote push) have the same bound."""
    raw = VALID + b"#" * loader.MAX_FILE_BYTES
    _, problems = loader.parse_yaml(raw, "config", loader.Positions())
    assert problems == [f"config:1:1: (file): {len(raw)} bytes; a config file is at most 1 MiB"]


def test_dates_are_text_and_nan_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fieldgate.yaml"
    path.write_text(
        VALID.decode().replace(
            "{id: gw-1}", "{id: gw-1, name: 2024-01-01, location: {latitude: .nan, longitude: 0}}"
        )
    )
    problems = _problems(path)
    assert problems == [f"{path}:1:60: gateway.location.latitude: Input should be a finite number"]


@pytest.mark.parametrize(
    "name", ["not-utf8", "utf16-bom", "nul", "esc", "deep-flow-10000", "alias-bomb", "empty"]
)
def test_check_verb_exits_1_without_a_traceback(name: str, tmp_path: Path) -> None:
    path = tmp_path / "fieldgate.yaml"
    path.write_bytes(HOSTILE[name][0]())
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.startswith(f"{path}:"), done.stdout


def test_check_verb_in_process_on_a_directory_and_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["check", str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'missing.yaml'}:1:1: (file): cannot read")


# --- fuzz ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _only_config_errors(raw: bytes, path: Path) -> None:
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert POSITIONED.match(line), line


FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzz_random_bytes(raw: bytes, fuzzdir: Path) -> None:
    _only_config_errors(raw, fuzzdir / "bytes.yaml")


@FUZZ
@given(raw=st.binary(max_size=40), at=st.integers(min_value=0, max_value=len(VALID)))
def test_fuzz_bytes_spliced_into_a_valid_config(raw: bytes, at: int, fuzzdir: Path) -> None:
    _only_config_errors(VALID[:at] + raw + VALID[at:], fuzzdir / "spliced.yaml")


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        ["2024-01-01", "0x1F", "1e400", ".nan", "~", "<<", "!!binary", "&a", "*a", "on", "10s", "0s"]
    ),
)
_YAML = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)
_SECTIONS = st.sampled_from(
    ["gateway", "upstream", "storage", "local", "buses", "devices", "commands", "schedules", "remote_config"]
)


@FUZZ
@given(
    doc=st.dictionaries(_SECTIONS, _YAML, max_size=5),
    flow=st.sampled_from([None, True, False]),
    template=st.sampled_from(["{}", "---\n{}", "{}\n...\n", "%YAML 1.1\n---\n{}", "&top {}", "!!map {}"]),
)
def test_fuzz_random_yaml_structures(
    doc: dict[str, Any], flow: bool | None, template: str, fuzzdir: Path
) -> None:
    text = yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True)
    _only_config_errors(template.format(text).encode("utf-8", "surrogatepass"), fuzzdir / "structure.yaml")


@FUZZ
@given(
    anchors=st.lists(
        st.tuples(st.sampled_from("abc"), st.sampled_from(["[1, 2]", "{k: v}", "x", "*a", "*b"])), max_size=6
    ),
    use=st.lists(st.sampled_from(["*a", "*b", "*c", "[*a, *a]", "{<<: *a}"]), max_size=4),
)
def test_fuzz_anchors_and_aliases(anchors: list[tuple[str, str]], use: list[str], fuzzdir: Path) -> None:
    lines = [f"x{i}: &{name} {value}" for i, (name, value) in enumerate(anchors)]
    lines += [f"y{i}: {value}" for i, value in enumerate(use)]
    _only_config_errors(("\n".join(lines) + "\n").encode(), fuzzdir / "aliases.yaml")


def test_parse_yaml_records_positions_of_an_empty_document() -> None:
    pos = Positions()
    data, problems = parse_yaml(b"# empty\n", "f.yaml", pos)
    assert (data, problems) == ({}, []) and str(pos.find(("gateway",))) == "f.yaml:1:1"
