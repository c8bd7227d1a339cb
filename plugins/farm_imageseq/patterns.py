"""Output patterns for image sequences: ``shot_####.png`` or ``shot_%04d.png``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

_HASHES = re.compile(r"#+")
_PRINTF = re.compile(r"%0?(\d*)d")


@dataclass(frozen=True)
class FramePattern:
    prefix: str
    padding: int
    suffix: str

    @classmethod
    def parse(cls, text: str) -> FramePattern:
        path = PurePosixPath(text)
        if path.is_absolute() or ".." in path.parts or not text.strip():
            raise ValueError(f"{text!r} must be a relative name inside the destination, such as shot_####.png")
        hashes = list(_HASHES.finditer(text))
        printf = list(_PRINTF.finditer(text))
        if len(hashes) + len(printf) != 1:
            raise ValueError(f"{text!r} needs exactly one frame number: #### or %04d")
        match = (hashes or printf)[0]
        padding = len(match.group(0)) if hashes else int(match.group(1) or 1)
        suffix = text[match.end():]
        if "." not in PurePosixPath(suffix).name:
            raise ValueError(f"{text!r} needs a file extension after the frame number, such as .png")
        return cls(text[: match.start()], padding, suffix)

    def name(self, frame: int) -> str:
        return f"{self.prefix}{frame:0{self.padding}d}{self.suffix}"

    @property
    def printf(self) -> str:
        return f"{self.prefix}%0{self.padding}d{self.suffix}"

    @property
    def extension(self) -> str:
        return self.suffix.rsplit(".", 1)[-1].lower() if "." in self.suffix else ""
