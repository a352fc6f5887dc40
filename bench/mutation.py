"""Mutation testing of the modules that must not lose or repeat anything (issue 19): mutmut 3 over each module,
with that module's own fast unit tests as the only runner.

Run (one command, about 10-25 minutes per module on a loaded 2-core machine; never in CI):

    .venv/bin/python -m bench.mutation                      # every module below
    .venv/bin/python -m bench.mutation commands planner     # some of them
    .venv/bin/python -m bench.mutation --max-children 1 --budget 900 --json out.json

It needs mutmut (`.venv/bin/pip install -e '.[mutation]'`). Each module runs in its own scratch copy of the
tree, build/mutation/<module>/ (agent/, drivers/, tests/ and pyproject.toml with a generated `[tool.mutmut]`
section naming the one file to mutate and the module's tests), so the modules' runs have different test
selections, mutmut's `mutants/` directory never lands in the worktree, and a rerun starts from scratch
(`--keep` reuses the previous run's results: mutmut then only reruns what changed;
`--retest-survivors` reruns only the mutants the previous run did not kill, after tests were added). Each module's run is
bounded by `--budget` seconds; at the end it is interrupted and the mutants not tried are reported as
`not_checked` (the score is then of a partial run, and says so).

Prints one JSON object, then a Markdown table: per module, mutants killed / total, timeouts (counted as
killed: the mutant made the tests hang, the per-test timeout caught it), survivors (with their names, for
docs/TESTING.md), mutants no selected test reaches, and the score = (killed + timeouts) / total.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "build" / "mutation"


@dataclass(frozen=True)
class Target:
    name: str
    path: str  # the one file mutated
    tests: tuple[str, ...]  # the module's fast unit tests: the only tests run against its mutants
    functions: tuple[str, ...] = ()  # mutmut mutant-name globs, when only part of the file is under test
    deselect: tuple[str, ...] = ()  # tests of the selected files left out (pytest --deselect)
    note: str = ""


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "commands",
            "agent/control/commands.py",
            ("tests/unit/test_commands.py", "tests/unit/test_commands_edges.py"),
            note="test_commands_fuzz.py left out: ~10 s of hypothesis per surviving mutant would take the run "
            "past an hour",
        ),
        Target("planner", "drivers/modbus/planner.py", ("tests/unit/test_modbus_planner.py",)),
        Target(
            "uplink_ack",
            "agent/upstream/mqtt.py",
            ("tests/unit/test_uplink_ack.py",),
            functions=(
                "agent.upstream.mqtt.xǁUplinkǁ_ack_flusher__mutmut_*",
                "agent.upstream.mqtt.xǁUplinkǁflush_acks__mutmut_*",
            ),
            note="the ack path only: Uplink._ack_flusher and Uplink.flush_acks",
        ),
        Target(
            "store",
            "agent/pipeline/store.py",
            (
                "tests/unit/test_store.py",
                "tests/unit/test_store_writer.py",
                "tests/unit/test_store_ledger.py",
                "tests/unit/test_store_seqmark.py",
            ),
            deselect=(
                # checks that the ledger's model can fail (with Store.pin patched out): 10 s, and no
                # assertion on the store's own behaviour
                "tests/unit/test_store_ledger.py::test_the_model_catches_an_eviction_of_rows_in_flight",
            ),
        ),
    )
}

# Survivors proven equivalent by reading them (docs/TESTING.md gives each proof), beyond the SQL-case ones the
# classifier recognises: mutmut's name -> (the mutant's changed line, why). A mutant counts as equivalent only
# while its changed line is still that one (a change of the module renumbers the mutants: then it is read again).
INIT_SET_AT_OPEN = (
    "a field open() sets before anything reads it (_load_state, _apply_pragmas, _connect_checked, open itself); "
    "no public method reads it on a store that is not open"
)
EVICT_GUARD = (
    "both callers ask only when the rows use more than the data budget, which is above the eviction target by "
    "at least min(5 % of the budget, a WAL step) > 1 byte, with rows in the table: the guard never returns"
)
META_KEYS = (
    "the schema's INSERT OR IGNORE, run at every open in the transaction before _load_state, puts both keys in "
    "meta: the default of get() is never used"
)
LANE_DEFAULT = "_set_lane_state gives every lane its entry: the default of get() is never used"
ZIP_STRICT = "the SELECT has one column per lane name: names and row always have the same length"
PROVEN_EQUIVALENT: dict[str, dict[str, tuple[str, str]]] = {
    "store": {
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_54": ("self._page_size = None", INIT_SET_AT_OPEN),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_55": ("self._page_size = 4097", INIT_SET_AT_OPEN),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_56": ("self._next_seq = None", INIT_SET_AT_OPEN),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_57": ("self._next_seq = 2", INIT_SET_AT_OPEN),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_62": ("self._recovered = None", INIT_SET_AT_OPEN),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_63": ("self._recovered = 1", INIT_SET_AT_OPEN),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_74": (
            "self._lane_pending: dict[str, int] = None  # several lanes only (one lane: `_pending`)",
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_75": (
            "self._lane_gone: dict[str, int] = None  # rows taken out per lane by the running eviction/purge",
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_76": (
            "self._lane_evicted: dict[str, int] = None  # several lanes only (one lane: `_evicted`)",
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_77": (
            "self._pins: dict[int, int] = None",
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_80": (
            "self._seq_mark = None  # every seq handed out is below it (the side file says so, durably)",
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_81": (
            "self._seq_mark = 1  # every seq handed out is below it (the side file says so, durably)",
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_82": (
            'self._mark_floor: int | None = ""  # during open: the side file\'s H - 1',
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_83": (
            "self._wal_mode = None  # False where the filesystem refused WAL (then no -wal is ever left behind)",
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_84": (
            "self._wal_mode = False  # False where the filesystem refused WAL (then no -wal is ever left behind)",
            INIT_SET_AT_OPEN,
        ),
        "agent.pipeline.store.xǁStoreǁ__init____mutmut_71": (
            "self._lanes: dict[str, int] = {DEFAULT_LANE: 2}  # name -> bit mask; one lane: ack deletes at once",
            "with one lane its bit is never read (pin, fetch and ack take the full mask), and set_lanes "
            "replaces the mapping",
        ),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_3": (
            "if excess <= 0 and rows_in_table <= 0:",
            EVICT_GUARD,
        ),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_4": (
            "if excess < 0 or rows_in_table <= 0:",
            EVICT_GUARD,
        ),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_5": (
            "if excess <= 1 or rows_in_table <= 0:",
            EVICT_GUARD,
        ),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_6": (
            "if excess <= 0 or rows_in_table < 0:",
            EVICT_GUARD,
        ),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_8": ("return 1, 0", EVICT_GUARD),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_9": ("return 0, 1", EVICT_GUARD),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_22": (
            "count = max(1, math.ceil(excess / max(2.0, used / rows_in_table)))",
            "used / rows_in_table is the bytes of whole pages per row: a row's cell alone is more than 2 bytes",
        ),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_26": (
            "pinned = sorted(self._pins) if (self._pins) or True else []",
            "sorted() of no pins is [] too",
        ),
        "agent.pipeline.store.xǁStoreǁ_evict_oldest__mutmut_56": (
            "if below <= held or row is None and cutoff == max_seq:",
            "when only cutoff == max_seq holds, one more turn of the loop finds the same cutoff and the same "
            "pinned rows below it (below == held) and stops there: same rows deleted",
        ),
        "agent.pipeline.store.xǁStoreǁset_lanes__mutmut_24": (
            "self._set_lane_state(None, {DEFAULT_LANE: 1})",
            "_set_lane_state reads the connection only for several lanes; this call gives it one",
        ),
        "agent.pipeline.store.x__complement__mutmut_3": (
            "lo = 1",
            "seqs start at 1: a range from 0 or from 1 deletes the same rows",
        ),
        "agent.pipeline.store.x__complement__mutmut_4": (
            "if p >= lo:",
            "the extra range is (lo, lo - 1), which no seq is BETWEEN: nothing deleted, nothing counted",
        ),
        "agent.pipeline.store.x__ranges__mutmut_9": (
            "if s != prev - 1:",
            "every seq becomes a range of its own: the same seqs, one statement per seq instead of per run",
        ),
        "agent.pipeline.store.xǁStoreǁ_count_lane_rows__mutmut_15": (
            "for name, count in zip(names, row, strict=None):",
            ZIP_STRICT,
        ),
        "agent.pipeline.store.xǁStoreǁ_count_lane_rows__mutmut_18": (
            "for name, count in zip(names, row, ):",
            ZIP_STRICT,
        ),
        "agent.pipeline.store.xǁStoreǁ_count_lane_rows__mutmut_19": (
            "for name, count in zip(names, row, strict=False):",
            ZIP_STRICT,
        ),
        "agent.pipeline.store.xǁStoreǁ_maybe_vacuum__mutmut_16": (
            "step = max(2, self._wal_step // self._page_size)",
            "the WAL step is at least 16 KiB, four of the store's 4 KiB pages: max(1, x) == max(2, x); with pages "
            "over 8 KiB (a file the store did not create) it would only split the same vacuum into fewer steps",
        ),
        "agent.pipeline.store.xǁStoreǁ_maybe_vacuum__mutmut_21": (
            "for _ in range(free // step + 3):",
            "each turn frees `step` pages (or what is left): the loop ends on an empty freelist before its "
            "free // step + 2 turns are used up, so a third extra turn is never reached",
        ),
        "agent.pipeline.store.xǁStoreǁfetch__mutmut_2": (
            "if limit < 0:",
            "a limit of 0 goes on to LIMIT 0, which returns no row either",
        ),
        "agent.pipeline.store.xǁStoreǁ_apply_lane_gone__mutmut_1": (
            "if len(self._lanes) >= 1:",
            "with one lane the per-lane pending dict is empty (__init__ and _set_lane_state): nothing to update",
        ),
        "agent.pipeline.store.xǁStoreǁ_apply_lane_gone__mutmut_15": (
            "self._lane_evicted[name] = self._lane_evicted.get(name, None) + gone",
            LANE_DEFAULT,
        ),
        "agent.pipeline.store.xǁStoreǁ_apply_lane_gone__mutmut_17": (
            "self._lane_evicted[name] = self._lane_evicted.get(name, ) + gone",
            LANE_DEFAULT,
        ),
        "agent.pipeline.store.xǁStoreǁ_apply_lane_gone__mutmut_18": (
            "self._lane_evicted[name] = self._lane_evicted.get(name, 1) + gone",
            LANE_DEFAULT,
        ),
        "agent.pipeline.store.xǁStoreǁ_apply_lane_gone__mutmut_19": (
            "self._lane_gone = None",
            "append and purge, its only users, set it to {} before they count anything",
        ),
        "agent.pipeline.store.xǁStoreǁappend__mutmut_48": (
            "cutoff = 1",
            "it is read only after an eviction, which sets it to a seq of at least 1",
        ),
        "agent.pipeline.store.xǁStoreǁ_load_state__mutmut_40": (
            'self._evicted = int(meta.get("evicted", None))',
            META_KEYS,
        ),
        "agent.pipeline.store.xǁStoreǁ_load_state__mutmut_42": (
            'self._evicted = int(meta.get("evicted", ))',
            META_KEYS,
        ),
        "agent.pipeline.store.xǁStoreǁ_load_state__mutmut_45": (
            'self._evicted = int(meta.get("evicted", 1))',
            META_KEYS,
        ),
        "agent.pipeline.store.xǁStoreǁ_load_state__mutmut_49": (
            'self._recovered = int(meta.get("recovered", None))',
            META_KEYS,
        ),
        "agent.pipeline.store.xǁStoreǁ_load_state__mutmut_51": (
            'self._recovered = int(meta.get("recovered", ))',
            META_KEYS,
        ),
        "agent.pipeline.store.xǁStoreǁ_load_state__mutmut_54": (
            'self._recovered = int(meta.get("recovered", 1))',
            META_KEYS,
        ),
        "agent.pipeline.store.xǁStoreǁ_reserve__mutmut_5": (
            "self._write_mark(high, closed=None)",
            "None and False are both false: the side file says open either way",
        ),
        "agent.pipeline.store.xǁStoreǁ_write_mark__mutmut_12": (
            "fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 385)",
            "the mode only applies until the fchmod(0o600) that follows, before anything is written",
        ),
        "agent.pipeline.store.xǁStoreǁ_write_mark__mutmut_30": (
            "os.write(fd, f\"{high} {'closed' if closed else 'open'}\\n\".encode(\"ASCII\"))",
            'codec names are case-insensitive: "ASCII" is "ascii"',
        ),
        "agent.pipeline.store.xǁStoreǁ_write_mark__mutmut_9": (
            "fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, )",
            "the mode only applies until the fchmod(0o600) that follows, before anything is written",
        ),
        "agent.pipeline.store.xǁStoreǁ_set_lane_state__mutmut_10": (
            "if len(lanes) >= 1:",
            "with one lane the per-lane counts it fills are never read (lane_pending and lane_evicted use "
            "the store's own)",
        ),
        "agent.pipeline.store.x__time_floor_seq__mutmut_5": (
            "return max(2, time.time_ns() // 1_000_000 * 1000)",
            "the time value is at least 1000 on any clock past 1970-01-01T00:00:00.001Z: max(1, x) == max(2, x)",
        ),
        "agent.pipeline.store.xǁAsyncStoreǁ__init____mutmut_10": (
            "self._closed = None",
            "only ever read as `if self._closed`: None and False are both false",
        ),
        "agent.pipeline.store.xǁStoreǁ_salvage__mutmut_61": (
            "if row is not None and isinstance(row[0], int) and row[0] > 0:",
            "a counter read as 0 leaves the default, which is 0",
        ),
        "agent.pipeline.store.xǁStoreǁ_salvage__mutmut_62": (
            "if row is not None and isinstance(row[0], int) and row[0] >= 1:",
            "a counter read as 0 leaves the default, which is 0",
        ),
        "agent.pipeline.store.xǁStoreǁpurge__mutmut_26": (
            "chunk = max(101, self._wal_step // 128)",
            "the WAL step is at least 16 KiB (a quarter of the 64 KiB floor), so wal_step // 128 >= 128 wins",
        ),
        "agent.pipeline.store.xǁStoreǁpurge__mutmut_28": (
            "chunk = max(100, self._wal_step // 129)",
            "the chunk only splits the purge into transactions: the loop runs until a chunk comes back short, "
            "the rows deleted, the counters and the log line are the same",
        ),
        "agent.pipeline.store.xǁStoreǁset_max_page_count__mutmut_8": (
            'self._conn.execute(f"PRAGMA max_page_count = {int(pages) if pages is not None else 4294967295}")',
            "SQLite clamps max_page_count to 4294967294: both set the same ceiling (read back on SQLite 3.40)",
        ),
        "agent.pipeline.store.xǁStoreǁ_recover__mutmut_42": (
            "conn.execute(\"DELETE FROM SQLITE_SEQUENCE WHERE NAME = 'READINGS'\")",
            "the fresh database has no row in sqlite_sequence yet (nothing was ever inserted): the DELETE removes "
            "nothing whichever name it looks for",
        ),
    },
}

# mutmut's exit-code classes (mutmut/stats.py), folded into the columns of the table.
STATUS = {
    1: "killed",
    3: "killed",  # pytest internal error under the mutant: a kill
    0: "survived",
    5: "no_tests",
    33: "no_tests",
    34: "skipped",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "killed",  # caught by the type checker (not configured here)
    -11: "segfault",
    -9: "segfault",
    2: "interrupted",
    None: "not_checked",
}


def mutmut_exe() -> Path:
    exe = Path(sys.executable).parent / "mutmut"
    if not exe.exists():
        sys.exit(
            "bench.mutation: mutmut is not installed in this venv: .venv/bin/pip install -e '.[mutation]'"
        )
    return exe


def prepare(target: Target, keep: bool) -> Path:
    """A scratch copy of the tree with a pyproject naming this target's file and tests."""
    work = SCRATCH / target.name
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for tree in ("agent", "drivers", "tests"):
        shutil.copytree(ROOT / tree, work / tree, ignore=ignore, dirs_exist_ok=True)
    pyproject = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in pyproject:
        sys.exit(
            "bench.mutation: pyproject.toml has its own [tool.mutmut]; this script generates it per module"
        )
    section = {
        "source_paths": ["agent", "drivers"],  # the whole packages are importable from mutants/
        "only_mutate": [target.path],
        "pytest_add_cli_args_test_selection": [
            *target.tests,
            *(arg for test in target.deselect for arg in ("--deselect", test)),
        ],
        # A mutant that makes a test wait forever uses no CPU, so mutmut's CPU-time limit never fires:
        # pytest-timeout ends it (the project's default of 120 s is for the integration tests).
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "--timeout=30"],
        "use_git_change_detection": False,  # the scratch copy is no git tree
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    (work / "pyproject.toml").write_text(pyproject + "\n".join(lines) + "\n")
    tomllib.loads((work / "pyproject.toml").read_text())  # a broken section fails here, not inside mutmut
    return work


def previous_results(target: Target) -> dict[str, int | None]:
    meta_path = SCRATCH / target.name / "mutants" / (target.path + ".meta")
    if not meta_path.exists():
        return {}
    codes: dict[str, int | None] = json.loads(meta_path.read_text())["exit_code_by_key"]
    if target.functions:
        codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, g) for g in target.functions)}
    return codes


def run_target(
    target: Target,
    max_children: int,
    budget: float,
    keep: bool,
    retest: bool = False,
    report_only: bool = False,
    only: tuple[str, ...] = (),
) -> dict[str, Any]:
    if report_only:
        return report(target, SCRATCH / target.name, None, False, 0.0)
    selection = list(target.functions)
    if retest:
        # Only the mutants not killed last time: the code is unchanged (mutmut would notice otherwise and
        # regenerate), so a killed mutant stays killed, and the tests added since get their chance.
        keep = True
        selection = [
            k
            for k, v in previous_results(target).items()
            if STATUS.get(v) not in ("killed", "timeout")
            and (not only or any(fnmatch.fnmatch(k, g) for g in only))
        ]
        # Equivalent mutants (SQL case, and those proven so): no test can kill them, retesting them only costs
        # time.
        equivalent = {
            name
            for name, diff in diffs(SCRATCH / target.name, target.path, selection).items()
            if classify_survivor(target, name, diff)[0] in ("sql-case", "equivalent")
        }
        selection = [k for k in selection if k not in equivalent]
        if not selection:
            return report(target, SCRATCH / target.name, None, False, 0.0)  # nothing left to retest
    work = prepare(target, keep)
    log_path = work / "mutmut.log"
    cmd = [str(mutmut_exe()), "run", "--max-children", str(max_children), *selection]
    started = time.monotonic()
    interrupted = False
    with log_path.open("w") as log:
        # Its own process group, so that the interrupt at the budget reaches mutmut's forked workers too.
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            interrupted = True
            # SIGTERM: mutmut 3.8.1 stops and keeps the results so far (it saves each mutant's as it comes).
            # After a SIGINT it went on with the next mutants (seen on the store's run of 2026-12-02).
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    return report(target, work, rc, interrupted, time.monotonic() - started)


def report(target: Target, work: Path, rc: int | None, interrupted: bool, elapsed: float) -> dict[str, Any]:
    log_path = work / "mutmut.log"
    meta_path = work / "mutants" / (target.path + ".meta")
    if not meta_path.exists():
        tail = log_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"bench.mutation: {target.name}: mutmut produced no results (rc {rc}):\n{tail}")
    meta = json.loads(meta_path.read_text())
    codes: dict[str, int | None] = meta["exit_code_by_key"]
    if target.functions:
        codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, g) for g in target.functions)}
    by_status: dict[str, list[str]] = {}
    for name, code in sorted(codes.items()):
        by_status.setdefault(STATUS.get(code, "suspicious"), []).append(name)
    total = len(codes)
    killed = len(by_status.get("killed", []))
    timeouts = len(by_status.get("timeout", []))
    survivors = by_status.get("survived", []) + by_status.get("no_tests", [])
    classified = {}
    for name, diff in diffs(work, target.path, survivors).items():
        kind, line, why = classify_survivor(target, name, diff)
        classified[name] = {"class": kind, "change": line, "status": STATUS.get(codes[name], "?")}
        if why:
            classified[name]["why"] = why
    equivalent = sum(1 for c in classified.values() if c["class"] == "sql-case")
    proven = sum(1 for c in classified.values() if c["class"] == "equivalent")
    unchecked = len(by_status.get("not_checked", [])) + len(by_status.get("interrupted", []))
    checked = total - unchecked
    caught = killed + timeouts
    return {
        "module": target.name,
        "file": target.path,
        "tests": list(target.tests),
        "deselected": list(target.deselect),
        "functions": list(target.functions),
        "note": target.note,
        "total": total,
        "killed": killed,
        "timeout": timeouts,
        "survived": len(by_status.get("survived", [])),
        "no_tests": len(by_status.get("no_tests", [])),
        "not_checked": len(by_status.get("not_checked", [])) + len(by_status.get("interrupted", [])),
        "other": sum(
            len(v)
            for k, v in by_status.items()
            if k not in ("killed", "timeout", "survived", "no_tests", "not_checked", "interrupted")
        ),
        "score": round((killed + timeouts) / total, 4) if total else None,
        # of a partial run: the score of the mutants it did check
        "score_checked": round((killed + timeouts) / (total - unchecked), 4) if total > unchecked else None,
        "sql_case_equivalent": equivalent,
        "text_only": sum(1 for c in classified.values() if c["class"] == "text"),
        "score_without_equivalent": round((killed + timeouts) / (total - equivalent), 4)
        if total > equivalent
        else None,
        "proven_equivalent": proven,
        # the standard mutation score: killed / (mutants - equivalent ones), SQL case and proven alike; of a
        # partial run, of the mutants it checked
        "score_standard": round(caught / (checked - equivalent - proven), 4)
        if checked > equivalent + proven
        else None,
        "survivors": classified,
        "partial": interrupted or bool(by_status.get("not_checked")),
        "seconds": round(elapsed, 1),
        "mutmut_rc": rc,
        "log": str(log_path.relative_to(ROOT)),
    }


SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|BEGIN|COMMIT|ROLLBACK|PRAGMA|CREATE|ALTER|VACUUM|FROM|WHERE|VALUES|BETWEEN)\b"
    r"|[=<>] \?",  # a fragment of a WHERE clause: "device = ?", "ts < ?"
    re.IGNORECASE,
)
SQL_STRING = re.compile(r"'[^']*'")
"""An SQL string literal: its case matters ('readings' is not 'READINGS'), unlike keywords and names."""
_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
path = sys.argv[1]
print(json.dumps({name: get_diff_for_mutant(name, path=path) for name in json.load(sys.stdin)}))
"""


def diffs(work: Path, path: str, names: list[str]) -> dict[str, str]:
    """The diff of each mutant against the original function, from mutmut itself (`mutmut show`)."""
    if not names:
        return {}
    out = subprocess.run(
        [sys.executable, "-c", _DIFFS, path],
        cwd=work,
        input=json.dumps(names),
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, str] = json.loads(out.stdout)
    return result


def classify_survivor(target: Target, name: str, diff: str) -> tuple[str, str, str]:
    """(class, changed line, why): classify()'s, or "equivalent" for a mutant of PROVEN_EQUIVALENT."""
    kind, line = classify(diff)
    proven = PROVEN_EQUIVALENT.get(target.name, {}).get(name)
    if kind != "sql-case" and proven is not None and proven[0] == line:
        return "equivalent", line, proven[1]
    return kind, line, ""


def classify(diff: str) -> tuple[str, str]:
    """(class, the changed line) of a surviving mutant, from its diff.

    sql-case: only the case of an SQL statement (or of a WHERE fragment such as `device = ?`) changed, not
    inside one of its string literals; SQLite's keywords and identifiers are case-insensitive, so the mutant
    is equivalent (`WHERE key = 'evicted'` -> `WHERE KEY = 'EVICTED'` is not: it matches no row). text: only
    the wording of a string that is not SQL changed (mutmut's "XX...XX" or its case), a log or error
    message's text. other: to be read (docs/TESTING.md lists them).
    """
    minus = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    plus = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    shown = (plus[0] if plus else minus[0] if minus else "").strip()
    if len(minus) == len(plus) and minus:
        pairs = list(zip(minus, plus, strict=True))
        if all(_sql_changed(a, b) for a, b in pairs):
            same_case = all(a.lower() == b.lower() for a, b in pairs)
            same_strings = all(SQL_STRING.findall(a) == SQL_STRING.findall(b) for a, b in pairs)
            return ("sql-case" if same_case and same_strings else "other"), shown
        if all(a.lower() == b.replace("XX", "").lower() for a, b in pairs):
            return "text", shown
    return "other", shown


PY_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
"""A Python string literal in double quotes, as the store writes its SQL and its messages."""


def _sql_changed(before: str, after: str) -> bool:
    """Whether every Python string literal the mutant changed is SQL: `raise self._error("setting the
    upstream lanes", exc) from exc` upper-cased is a message's text, although the line says FROM."""
    changed = [a for a, b in zip(PY_STRING.findall(before), PY_STRING.findall(after), strict=False) if a != b]
    return bool(changed) and all(SQL_WORDS.search(a) for a in changed)


def table(results: list[dict[str, Any]]) -> str:
    out = [
        "| module | file | killed / total | timeouts | survived | no test reaches | not checked | score "
        "| of them SQL case (equivalent) | other proven equivalent | text only | score without the SQL-case ones "
        "| standard score (equivalents excluded) | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        score = "n/a" if r["score"] is None else f"{100 * r['score']:.1f} %"
        if r["partial"]:
            score += f" (partial; {pct(r['score_checked'])} of those checked)"
        out.append(
            f"| {r['module']} | {r['file']} | {r['killed'] + r['timeout']} / {r['total']} | {r['timeout']} "
            f"| {r['survived']} | {r['no_tests']} | {r['not_checked']} | {score} | {r['sql_case_equivalent']} "
            f"| {r['proven_equivalent']} | {r['text_only']} | {pct(r['score_without_equivalent'])} "
            f"| {pct(r['score_standard'])}{' of those checked' if r['partial'] else ''} | {r['seconds']:.0f} s |"
        )
    return "\n".join(out)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help="some of: " + ", ".join(TARGETS) + " (default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--budget", type=float, default=1500, help="seconds per module (default 1500)")
    parser.add_argument("--keep", action="store_true", help="reuse the previous run's results (incremental)")
    parser.add_argument(
        "--retest-survivors",
        action="store_true",
        help="rerun only the previous run's surviving and unchecked mutants (after adding tests)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="with --retest-survivors: only the survivors whose mutmut name matches (repeatable)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="no run: the figures of the last run in build/mutation/"
    )
    parser.add_argument("--json", type=Path, help="also write the JSON to this file")
    args = parser.parse_args()
    names = args.modules or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}: choose among {', '.join(TARGETS)}")
    mutmut_exe()
    results = []
    for name in names:
        print(f"bench.mutation: {name} ...", file=sys.stderr, flush=True)
        results.append(
            run_target(
                TARGETS[name],
                args.max_children,
                args.budget,
                args.keep,
                args.retest_survivors,
                args.report_only,
                tuple(args.only),
            )
        )
    doc = {"tool": "mutmut " + _mutmut_version(), "max_children": args.max_children, "modules": results}
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print()
    print(table(results))


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


if __name__ == "__main__":
    main()
