"""fieldgate's Linky TIC codec against enedis-tic (an independent decoder on PyPI; test dependency only).

Group by group: the vendored frames of both modes, and groups generated from the Enedis specifications
(Enedis-NOI-CPT_54E standard mode, Enedis-NOI-CPT_02E historic mode) with correct and damaged checksums.
Both must accept and reject the same groups and read the same label, data and horodate; differences
only as listed in ALLOWED, with the reason.
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import pytest
from enedis_tic.link_layer import FrameFactory

from agent.errors import DecodeError
from drivers.tic import codec
from tests.vectors import load_vectors

ALLOWED: dict[str, str] = {
    "checksum is a space": "the checksum character is a space when the sum's 6 bits are 0 (NOI-CPT_02E "
    "§6.1.2, NOI-CPT_54E §6.2.3); fieldgate reads a group from its end, enedis-tic splits on spaces and "
    "takes the historic group for one with a horodate (TypeError)",
    "other mode's checksum": "enedis-tic accepts either checksum method in either mode (with or without the "
    "separator before the checksum); the specifications give one per mode (historic: without, NOI-CPT_02E; "
    "standard: with, NOI-CPT_54E), which fieldgate enforces",
    "horodate century": "a horodate's year has two digits (SAAMMJJhhmmss, NOI-CPT_54E); enedis-tic uses "
    "strptime's %y pivot (69-99 -> 1969-1999), fieldgate reads 20YY: the standard mode exists only on Linky "
    "meters, installed from 2015, so no horodate of the last century can occur",
    "SMAXSN3-1": "enedis-tic's label table spells the phase-3 maximum of day n-1 'SMAXSN1-3'; "
    "NOI-CPT_54E names it SMAXSN3-1 (like SMAXSN1-1, SMAXSN2-1); the unit (VA) agrees",
    "space in historic data": "historic data containing a space splits into more fields in enedis-tic, "
    "which then rejects or misreads the group; fieldgate parses from the end (the data is what lies "
    "between the label's separator and the checksum's)",
}
SEP = {"historic": " ", "standard": "\t"}


def reference_group(text: str, mode: str) -> dict[str, Any] | None:
    """enedis-tic's reading of one group (without LF/CR), None if it rejects it."""
    try:
        return FrameFactory.data_set(text, SEP[mode])
    except Exception:
        return None


def our_group(text: str, mode: str) -> dict[str, Any] | None:
    try:
        group = codec.parse_group(text.encode("ascii"), mode)  # type: ignore[arg-type]
    except DecodeError:
        return None
    out: dict[str, Any] = {"label": group.label, "data": group.data}
    if group.horodate is not None:
        out["datetime"] = group.horodate.iso_local()
    return out


def compare(text: str, mode: str) -> str | None:
    """None when both agree, else the disagreement in words."""
    ref, ours = reference_group(text, mode), our_group(text, mode)
    if ref is None or ours is None:
        return None if ref is ours else f"{mode} {text!r}: enedis-tic {ref}, fieldgate {ours}"
    if "datetime" in ref:
        ref = {**ref, "datetime": datetime.strftime(ref["datetime"], "%Y-%m-%dT%H:%M:%S")}
    return None if ref == ours else f"{mode} {text!r}: enedis-tic {ref}, fieldgate {ours}"


def reason_for(text: str, mode: str) -> str | None:
    year = text.split("\t")[1][1:3] if mode == "standard" and text.count("\t") == 3 else ""
    if year.isdigit() and int(year) >= 69:
        return "horodate century"
    if text.endswith(" ") and len(text) > 2 and text[-2] == SEP[mode]:
        return "checksum is a space"
    payload = text[:-2]
    if mode == "historic" and " " in payload.split(" ", 1)[1] if " " in payload else False:
        return "space in historic data"
    other = text[:-1] if mode == "historic" else text[:-2]
    if codec.checksum(other.encode("ascii")) == text[-1]:
        return "other mode's checksum"
    return None


def frame_groups(frame: bytes) -> list[str]:
    body = codec.split_frame(frame).decode("ascii")
    return [g[1:] for g in body.split("\r") if g.startswith("\n")]


V = load_vectors("linky_tic.json")


@pytest.mark.parametrize("vector", V["frame_vectors"], ids=[v["id"] for v in V["frame_vectors"]])
def test_frame_vectors_agree(vector: dict[str, Any]) -> None:
    for text in frame_groups(bytes.fromhex(vector["frame_hex"])):
        problem = compare(text, vector["mode"])
        if problem is not None:
            assert reason_for(text, vector["mode"]) in ALLOWED, problem


@pytest.mark.parametrize(
    ("mode", "vector"),
    [("historic", v) for v in V["group_vectors_historic"]]
    + [("standard", v) for v in V["group_vectors_standard"]],
    ids=lambda x: x if isinstance(x, str) else x["id"],
)
def test_group_vectors_agree(mode: str, vector: dict[str, Any]) -> None:
    text = vector["group_text"]
    problem = compare(text, mode)
    if problem is not None:
        assert reason_for(text, mode) in ALLOWED, problem


def make_group(rng: random.Random, mode: str) -> str:
    labels = [*codec._HISTORIC_UNITS, "ADCO", "OPTARIF", "PTEC"] if mode == "historic" else [
        *codec._STANDARD_UNITS, "ADSC", "NGTF", "LTARF", "STGE", "DATE", "SMAXSN", "CCASN"]  # fmt: skip
    label = rng.choice(labels)
    sep = SEP[mode]
    data = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
    payload = label + sep
    if mode == "standard" and rng.random() < 0.4:
        payload += (
            rng.choice("HE") + f"{rng.randint(0, 99):02d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        )
        payload += f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}" + sep
    payload += data
    covered = payload + sep if mode == "standard" else payload
    return payload + sep + codec.checksum(covered.encode("ascii"))


@pytest.mark.parametrize("mode", ["historic", "standard"])
def test_generated_groups_agree(mode: str) -> None:
    rng = random.Random(17)
    checked = 0
    for _ in range(600):
        text = make_group(rng, mode)
        if rng.random() < 0.5:  # damage one character (not a separator): both must reject it
            i = rng.randrange(len(text) - 2)
            if text[i] != SEP[mode]:
                text = text[:i] + chr(0x21 + (ord(text[i]) - 0x20) % 0x5D) + text[i + 1 :]
        problem = compare(text, mode)
        if problem is not None:
            assert reason_for(text, mode) in ALLOWED, problem
        else:
            checked += 1
    assert checked > 400  # the allow-list explains a few, never most


def test_the_other_modes_checksum_is_refused_by_fieldgate_only() -> None:
    payload = "PAPP 00420"
    text = payload + " " + codec.checksum((payload + " ").encode())  # standard's method in a historic group
    assert our_group(text, "historic") is None and reference_group(text, "historic") is not None
    assert reason_for(text, "historic") == "other mode's checksum"


def test_units_agree_with_the_reference_table() -> None:
    """Every label fieldgate publishes as a number has enedis-tic's unit (its infos.json table)."""
    import json
    import os

    import enedis_tic

    with open(os.path.join(os.path.dirname(enedis_tic.__file__), "infos.json")) as f:
        infos = json.load(f)
    ours = {**codec._HISTORIC_UNITS, **codec._STANDARD_UNITS}
    for label, unit in ours.items():
        if label == "SMAXSN3-1":
            # ALLOWED["SMAXSN3-1"]: enedis-tic spells it SMAXSN1-3
            assert infos["SMAXSN1-3"]["unit"] == unit
            continue
        assert infos[label]["unit"] == unit, label
