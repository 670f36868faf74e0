"""A small reader of the Dockerfile's instructions, for the tests (not a full parser:
enough for this Dockerfile's continuation lines and JSON forms)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    value: str
    stage: int  # index of the FROM this instruction follows (-1: before any)


def instructions(path: Path) -> list[Instruction]:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    out: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, value.strip(), stage))
    return out


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(v, str) for v in parsed), value
    return parsed


def env_pairs(value: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for word in shlex.split(value):
        key, sep, val = word.partition("=")
        assert sep, f"ENV in key=value form only: {word!r}"
        pairs[key] = val
    return pairs
