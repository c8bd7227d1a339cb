"""The plugin manager: every processor, bundled or not, arrives through the
``farm`` entry-point group.

A plugin that fails to import is reported as a warning naming it and the way to
remove it; Farm goes on without it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from farm import hookspecs
from farm.errors import FarmError, UsageError
from farm.processor import Processor

ENTRY_POINT_GROUP = "farm"
log = logging.getLogger("farm.plugins")


class UnknownProcessor(FarmError):
    pass


@dataclass
class PluginFailure:
    name: str
    reason: str


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    processors: dict[str, Processor] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.manager.hook

    def processor(self, name: str) -> Processor:
        try:
            return self.processors[name]
        except KeyError:
            known = ", ".join(sorted(self.processors)) or "none are installed"
            raise UnknownProcessor(
                f"unknown processor {name!r}; registered processors: {known}"
            ) from None

    def configure(self, settings: dict[str, Any]) -> None:
        """Hand each plugin the ``plugins:`` section of farm.yaml; a plugin that refuses
        its settings stops the start with its own message."""
        for impl in self.manager.hook.farm_configure.get_hookimpls():
            try:
                impl.function(settings=settings)
            except (FarmError, ValueError) as exc:
                raise UsageError(f"farm.yaml: plugins.{impl.plugin_name}: {exc}") from None

    def notify(self, hook_name: str, **kwargs: object) -> None:
        """Call a lifecycle hook; a failing plugin is logged, never fatal."""
        hook = getattr(self.manager.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            try:
                args = {name: kwargs[name] for name in impl.argnames}
                impl.function(**args)
            except Exception:  # a notification plugin must not stop the farm
                log.exception("plugin %s failed in %s", impl.plugin_name, hook_name)


def load_plugins(extra: list[object] | None = None, blocked: list[str] | None = None) -> Plugins:
    """Build the plugin manager from the entry points (plus ``extra`` plugin objects)."""
    manager = pluggy.PluginManager("farm")
    manager.add_hookspecs(hookspecs)
    for name in blocked or []:
        manager.set_blocked(name)
    plugins = Plugins(manager)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if manager.is_blocked(entry_point.name) or manager.has_plugin(entry_point.name):
            continue
        try:
            manager.register(entry_point.load(), name=entry_point.name)
        except Exception as exc:
            dist = entry_point.dist.name if entry_point.dist else entry_point.value
            reason = f"{type(exc).__name__}: {exc}"
            plugins.failures.append(PluginFailure(entry_point.name, reason))
            warnings.warn(
                f"farm plugin {entry_point.name!r} ({entry_point.value}) failed to load and is "
                f"skipped: {reason}. Fix it or remove it with: pip uninstall {dist}",
                stacklevel=2,
            )
    for index, plugin in enumerate(extra or []):
        manager.register(plugin, name=f"extra-{index}-{id(plugin)}")
    for impl in manager.hook.farm_processors.get_hookimpls():
        try:
            provided = impl.function() or []
        except Exception as exc:
            plugins.failures.append(PluginFailure(impl.plugin_name, f"farm_processors: {exc}"))
            warnings.warn(f"farm plugin {impl.plugin_name!r} failed in farm_processors: {exc}", stacklevel=2)
            continue
        for processor in provided:
            if processor.name in plugins.processors:
                warnings.warn(
                    f"farm plugin {impl.plugin_name!r} registers processor {processor.name!r}, "
                    "which is already registered; ignoring it",
                    stacklevel=2,
                )
                continue
            plugins.processors[processor.name] = processor
    return plugins
