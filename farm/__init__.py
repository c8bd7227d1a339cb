"""Farm: a plugin-based render farm on Dask distributed."""

from importlib.metadata import PackageNotFoundError, version

import pluggy

hookimpl = pluggy.HookimplMarker("farm")

try:
    __version__ = version("farm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_SCRIPTING = ("run", "start", "submit", "Batch", "JobHandle")


def __getattr__(name: str) -> object:
    # The scripting API pulls in Dask; loaded only when a script asks for it.
    if name in _SCRIPTING:
        from farm import scripting

        return getattr(scripting, name)
    raise AttributeError(f"module 'farm' has no attribute {name!r}")


__all__ = ["hookimpl", "__version__", *_SCRIPTING]
