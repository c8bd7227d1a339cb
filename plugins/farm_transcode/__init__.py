"""The `transcode` processor (being built; registers nothing yet)."""

from farm import hookimpl


@hookimpl
def farm_processors():
    return []
