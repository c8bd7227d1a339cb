"""Writes the generated reference pages: docs/profiles.md (from the pydantic schemas of
profiles and of the settings of every processor shipped with Farm) and docs/cli.md (from
`--help`).

    .venv/bin/python docs/generate.py          # rewrite both
    .venv/bin/python docs/generate.py --check  # exit 1 when a page is out of date
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

DOCS = Path(__file__).resolve().parent


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _nested(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += _nested(arg)
    return found


def model_table(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        default = "required" if info.is_required() else (
            "(computed)" if info.default_factory is not None else f"`{info.default!r}`")
        if info.default_factory is not None:
            try:
                value = info.default_factory()
                default = "(see below)" if isinstance(value, BaseModel) else f"`{value!r}`"
            except TypeError:
                pass
        meaning = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{prefix}{name}` | {_type_name(info.annotation)} | {default} | {meaning} |")
        nested += [(f"{prefix}{name}.", sub) for sub in _nested(info.annotation) if sub is not model]
    for sub_prefix, sub in nested:
        lines += ["", f"`{sub_prefix.rstrip('.')}`: {(sub.__doc__ or '').strip().splitlines()[0] if sub.__doc__ else ''}",
                  "", *model_table(sub, sub_prefix)]
    return lines


def _not_shipped() -> list[str]:
    """Plugins installed from other distributions: the pages document what ships with
    Farm, whatever else is installed next to it."""
    import importlib.metadata

    from farm.plugins import ENTRY_POINT_GROUP

    return [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            if ep.dist is None or ep.dist.name != "farm"]


def profiles_page() -> str:
    from farm.plugins import load_plugins
    from farm.profiles import Profile

    from farm.config import ProfileLimits

    lines = ["# Profile reference", "", "Generated from the schemas by `docs/generate.py`; do not edit by hand.", "",
             "## Keys common to every processor", "", *model_table(Profile), "",
             "## Limits", "",
             "What a profile may hold, set under `limits:` in farm.yaml (the controller's farm.yaml for "
             "submissions to a cluster). They are checked before anything is expanded: the file's size before it "
             "is read, nesting while it is read, aliases (`*name`) by counting the values they stand for, a frame "
             "range by arithmetic. A profile or `--set` value beyond one is refused in one line (exit 2; 400 from "
             "the API). Each `--set` value is held to the same nesting and values limits. A priority is a whole number "
             "from -1,000,000 to 1,000,000 (not a setting).", "",
             *model_table(ProfileLimits, "limits."), ""]
    plugins = load_plugins(blocked=_not_shipped())
    for name in sorted(plugins.processors):
        processor = plugins.processors[name]
        lines += [f"## `settings` of the `{name}` processor", "", processor.description or "", "",
                  *model_table(processor.settings_model, "settings."), ""]
    return "\n".join(lines)


def _paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += _paths(sub, (*prefix, name))
    return found


def cli_page() -> str:
    from farm.cli import build_parser

    os.environ["COLUMNS"] = "100"
    parser = build_parser()
    lines = ["# Command reference", "", "Generated from `--help` by `docs/generate.py`; do not edit by hand.", ""]
    for path in [(), *_paths(parser)]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser().parse_args([*path, "--help"])
        title = " ".join(("farm", *path))
        lines += [f"## `{title}`", "", "```", out.getvalue().rstrip(), "```", ""]
    return "\n".join(lines)


def state_diagram(kind: str) -> str:
    """A Mermaid state diagram of one entity's transition table (farm/model.py)."""
    from farm.model import TRANSITIONS

    table = TRANSITIONS[kind]
    lines = ["```mermaid", "stateDiagram-v2", f"    [*] --> {next(iter(table))}"]
    for old, targets in table.items():
        lines += [f"    {old} --> {new}" for new in sorted(targets)]
        if not targets:
            lines.append(f"    {old} --> [*]")
    lines.append("```")
    return "\n".join(lines)


PAGES = {"profiles.md": profiles_page, "cli.md": cli_page}


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for name, make in PAGES.items():
        text = make()
        path = DOCS / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run .venv/bin/python docs/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
