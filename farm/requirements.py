"""Matching what a job requires against what a node offers.

A requirement is ``{name: spec}``; the spec is empty or ``*`` (present at all), or
comma-separated comparisons of dotted versions: ``>=5``, ``>=3.4,<4``, ``==3.7``.
"""

from __future__ import annotations

import operator
import re

_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)?\s*([0-9][0-9A-Za-z.\-]*)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:4])


def satisfies(version: str, spec: str) -> bool:
    spec = spec.strip()
    if spec in ("", "*"):
        return True
    have = version_tuple(version)
    if not have:
        return False
    for clause in spec.split(","):
        match = _COMPARISON.match(clause)
        if not match:
            return False
        op, wanted = match.group(1) or ">=", version_tuple(match.group(2))
        width = max(len(have), len(wanted))
        padded_have = have + (0,) * (width - len(have))
        padded_wanted = wanted + (0,) * (width - len(wanted))
        if op == "==":
            padded_have = have[: len(wanted)] + (0,) * (width - len(wanted))
        if not _OPS[op](padded_have, padded_wanted):
            return False
    return True


def unmet_requirements(requires: dict[str, str], capabilities: dict[str, str]) -> list[str]:
    """Each requirement the capabilities do not meet, as a phrase (``blender >=3.4``)."""
    unmet = []
    for name, spec in requires.items():
        if name not in capabilities or not satisfies(capabilities[name], spec):
            unmet.append(f"{name} {spec}".strip())
    return unmet
