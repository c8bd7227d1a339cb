"""Outputs: their names, and their delivery into the destination, all or nothing.

Names come from a profile's template. Tokens: ``{stem}`` (the input's name without
extension), ``{profile}``, ``{ext}`` (the extension the processor writes, without the
dot), ``{date}`` (YYYY-MM-DD), and ``{job}``. A template that would leave the
destination is refused.

Delivery (:class:`Delivery`, or :func:`deliver` for a set of finished files) puts a
job's outputs in a hidden staging folder inside the destination, ``.farm-staging-JOB``,
then renames each into place. Without ``overwrite`` a rename never replaces a file
(another job's file that appeared meanwhile fails this delivery, naming it). When
anything goes wrong part-way, what this job renamed into place is taken out again (and
a file it replaced with ``overwrite`` is put back), so the destination holds all of a
job's outputs or none of them. The staging folder keeps a journal of the renames, so
that a process killed part-way can still be undone by the next start (:func:`sweep`).
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import logging
import os
import re
import shutil
import string
from collections.abc import Callable
from pathlib import Path

from farm.errors import ProcessorError
from farm.model import Job

OUTPUT_TOKENS = ("stem", "profile", "ext", "date", "job")


def output_path(job: Job, default_template: str, ext: str) -> Path:
    """The path in the destination for this job's output, from ``output:`` or the default."""
    template = job.profile.output or default_template
    values = {
        "stem": job.input.stem if job.input else job.profile.name,
        "profile": job.profile.name,
        "ext": ext.lstrip("."),
        "date": datetime.date.today().isoformat(),
        "job": job.id,
    }
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ProcessorError(f"output template {template!r} is malformed: {exc}") from None
    unknown = [name for name in fields if name not in OUTPUT_TOKENS]
    if unknown:
        known = ", ".join("{" + token + "}" for token in OUTPUT_TOKENS)
        raise ProcessorError(f"output template {template!r}: unknown token {{{unknown[0]}}}; expected {known}")
    name = template.format(**values)
    destination = job.destination.resolve()
    target = (destination / name).resolve()
    if not name or target == destination or not target.is_relative_to(destination):
        raise ProcessorError(f"output template {template!r} gives {name!r}, which is not inside {destination}")
    return target


def inside(target: Path, destination: Path) -> Path:
    """``target`` with its symbolic links followed, refused unless that is still inside
    ``destination``: a folder in the destination that links elsewhere is no way out."""
    root = destination.resolve()
    real = target.resolve()
    if real == root or not real.is_relative_to(root):
        raise ProcessorError(f"{target} leads to {real}, which is not inside the destination {root}")
    return real


log = logging.getLogger("farm.outputs")

#: A job's staging folder inside its destination: ``.farm-staging-JOB``.
STAGING_PREFIX = ".farm-staging-"
_JOURNAL = "journal"  # in the staging folder: one line per rename, written before it
_FILES = "files"  # in the staging folder: the outputs, laid out as in the destination
_REPLACED = "replaced"  # in the staging folder: links to files replaced with overwrite


def staging_folder(destination: Path, job_id: str) -> Path:
    return destination.resolve() / f"{STAGING_PREFIX}{job_id}"


#: Temporary names Farm has used next to an output: ``.clip.mp4.farm-1a2b3c4d`` and
#: ``.clip.farm-1a2b3c4d.mp4`` (a hex tag; ``.notes.farm-plan`` is a person's file).
_TEMPORARY = re.compile(r"^\..+\.farm-[0-9a-f]{4,}(\.[^.]+)?$")


def is_temporary(name: str) -> bool:
    """A temporary file Farm wrote next to an output, left behind only by a process that was killed."""
    return bool(_TEMPORARY.match(name))


def mib(size: float) -> str:
    """A size as people read it: 14 MiB, 2.5 MiB, 40 KiB."""
    value = size / 2**20
    if value >= 10:
        return f"{value:.0f} MiB"
    if size and value < 0.1:
        return f"{size / 1024:.0f} KiB"
    return f"{value:.1f}".rstrip("0").rstrip(".") + " MiB"


# -- renaming without replacing --------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not Linux, or a C library without it
    _renameat2 = None


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` unless ``target`` exists (FileExistsError), in one
    step: two processes cannot both win. Linux's renameat2(RENAME_NOREPLACE) where the
    file system supports it; else a hard link (which also refuses an existing name) and
    an unlink; else, on a file system with neither, a check and a rename."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(target):  # no hard links here: the last resort can race
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


# -- delivery ----------------------------------------------------------------------------------


class Delivery:
    """One job's delivery: outputs are staged in ``.farm-staging-JOB`` inside the
    destination (:meth:`stage` copies finished files there; :meth:`staged` names a path
    there for a processor to write into), then :meth:`commit` renames them all into place.

    ``claim`` (the scheduler's, from :attr:`farm.processor.Context.claim`) records the
    final paths as this job's in the store before anything is renamed, refusing paths
    another unfinished job holds. ``noun`` names the outputs in messages ("frames").
    Used as a context manager, a delivery that did not commit is removed on exit.
    """

    def __init__(self, job: Job, *, claim: Callable[[list[Path]], None] | None = None, noun: str = "outputs"):
        self.job_id = job.id
        self.destination = job.destination.resolve()
        self.work = job.work_dir.resolve()
        self.overwrite = job.overwrite
        self.claim = claim
        self.noun = noun
        self.folder = staging_folder(self.destination, job.id)
        self.files: dict[Path, Path] = {}  # final path -> staged path
        self._committed = False
        self._need = 0
        if self.folder.exists():  # an earlier try of this job, killed part-way: undo it first
            undo_staging(self.folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProcessorError(f"cannot make the staging folder {self.folder.name} in {self.destination}: "
                                 f"{exc.strerror or exc}; nothing was delivered") from None

    def __enter__(self) -> Delivery:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()

    def staged(self, target: Path, real: Path | None = None) -> Path:
        """The path in the staging folder that becomes ``target`` on :meth:`commit`
        (``real``: ``target`` resolved already, see :func:`real_paths`)."""
        real = real or target.resolve()
        if real == self.destination or not real.is_relative_to(self.destination):
            raise ProcessorError(f"{target} leads to {real}, which is not inside the destination {self.destination}")
        if real in self.files:
            raise ProcessorError(f"{real.relative_to(self.destination)} would be delivered twice; "
                                 "each output needs its own name")
        staged = self.folder / _FILES / real.relative_to(self.destination)
        try:
            staged.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProcessorError(f"cannot stage {real.name} in {self.destination}: {exc.strerror or exc}; "
                                 "nothing was delivered") from None
        self.files[real] = staged
        return staged

    def stage(self, files: dict[Path, Path]) -> None:
        """Copy finished files (``{target: source}``) into the staging folder, after checking
        that the destination's disk has room for them all."""
        for source in files.values():
            if source.is_symlink():  # copying would deliver whatever the link points at
                raise ProcessorError(f"the segment's output {source.name} is a symbolic link "
                                     f"(to {os.readlink(source)}); only files a segment writes are delivered")
            # a segment's result names its files, and a node (or whoever holds its
            # certificate) writes that result: only what lies in the job's work folder goes out
            if not source.resolve().is_relative_to(self.work):
                raise ProcessorError(f"a segment's result names {source}, which is not in the job's work folder "
                                     f"{self.work}; only files the job's segments wrote are delivered")
        _, need = self.check_room([source.stat().st_size for source in files.values()])
        copied = 0
        ordered = sorted(files.items())
        for (target, source), real in zip(ordered, real_paths([target for target, _ in ordered]), strict=True):
            staged = self.staged(target, real)
            try:
                shutil.copyfile(source, staged)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # filled by someone else meanwhile, or out of inodes
                    raise self._full(need, copied, len(files)) from None
                raise ProcessorError(f"cannot copy {source.name} into {self.destination}: {exc.strerror or exc}") from None
            copied += 1

    def check_room(self, sizes: list[int]) -> tuple[int, int]:
        """Refuse, before anything is written, outputs of these sizes (bytes) that the
        destination's disk has no room for; returns (free, needed) bytes."""
        disk = os.statvfs(self.folder)
        block = disk.f_frsize or 4096
        need = sum(-(-size // block) * block for size in sizes)  # a file system keeps whole blocks
        need += -(-256 * len(sizes) // block) * block  # the journal of the renames
        self._need += need
        free = disk.f_bavail * disk.f_frsize
        if need > free:
            raise ProcessorError(f"the destination's disk is full: {mib(free)} free, the {self.noun} need {mib(need)}; "
                                 f"nothing was delivered to {self.destination}")
        return free, need

    def _full(self, need: int, copied: int, count: int) -> ProcessorError:
        disk = os.statvfs(self.destination)  # in stage(), before the staged copies go: the disk as it filled
        if disk.f_files and disk.f_favail == 0:
            why = (f"no more files can be made there (it holds {disk.f_files:,} at most), "
                   f"and {count - copied:,} of the {count:,} {self.noun} were still to come")
        else:
            why = f"{mib(disk.f_bavail * disk.f_frsize)} free, the {self.noun} need {mib(need)}"
        return ProcessorError(f"the destination's disk is full: {why}; nothing was delivered to {self.destination}")

    def commit(self) -> list[Path]:
        """Rename every staged output into place; on any failure undo the renames and raise."""
        targets = sorted(self.files)
        for target in targets:
            if not self.files[target].is_file():
                raise ProcessorError(f"{target.name} was never written; nothing was delivered")
        if not self.overwrite:
            existing = [target for target in targets if os.path.lexists(target)]
            if existing:
                raise ProcessorError(f"{already_there(existing)}; set overwrite: true or pass --overwrite to "
                                     "replace; nothing was delivered")
        if self.claim is not None:
            self.claim(targets)
        journal = None
        made: list[Path] = []  # folders this delivery created, to take out again on undo
        try:
            journal = open(self.folder / _JOURNAL, "a", encoding="utf-8")
            for target in targets:
                staged = self.files[target]
                made.extend(_make_parents(target.parent, self.destination))
                backup = ""
                if self.overwrite and os.path.lexists(target):
                    backup_path = self.folder / _REPLACED / target.relative_to(self.destination)
                    backup_path.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(target, backup_path, follow_symlinks=False)
                        backup = str(backup_path)
                    except OSError:  # no hard links here: the replaced file cannot be put back
                        backup = ""
                stamp = os.lstat(staged)
                journal.write(f"{stamp.st_dev}\t{stamp.st_ino}\t{target}\t{backup}\n")
                journal.flush()
                if self.overwrite:
                    os.replace(staged, target)
                else:
                    rename_noreplace(staged, target)
        except BaseException as exc:
            if journal is not None:
                try:
                    journal.close()
                except OSError:
                    pass
            undo_staging(self.folder)
            for folder in reversed(made):
                try:
                    folder.rmdir()
                except OSError:
                    pass
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._full(self._need, 0, len(targets)) from None
            if isinstance(exc, FileExistsError):
                raise ProcessorError(f"{exc.filename} appeared while this job delivered (another job or person "
                                     "wrote it); nothing of this job was left in the destination") from None
            if isinstance(exc, OSError):
                raise ProcessorError(f"cannot deliver into {self.destination}: {exc.strerror or exc} "
                                     f"({exc.filename}); nothing of this job was left there") from None
            raise
        journal.close()
        self._committed = True
        shutil.rmtree(self.folder, ignore_errors=True)
        return targets

    def abort(self) -> None:
        """Remove the staging folder (and undo any rename a killed commit left)."""
        if self.folder.exists():
            undo_staging(self.folder)


def _make_parents(folder: Path, root: Path) -> list[Path]:
    """Create ``folder`` (inside ``root``) and its missing parents; return those created, outermost first."""
    missing = []
    while folder != root and not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def undo_staging(folder: Path, *, keep_delivered: bool = False) -> list[str]:
    """Take back what a delivery's journal says it renamed into place (only files still
    the very ones it renamed, and putting back files it replaced), then remove the
    staging folder. With ``keep_delivered`` (its job is done) only the folder goes.
    Returns the paths taken back."""
    taken: list[str] = []
    journal = folder / _JOURNAL
    lines = journal.read_text(encoding="utf-8").splitlines() if journal.is_file() and not keep_delivered else []
    for line in reversed(lines):
        try:
            dev, ino, target, backup = line.split("\t")
            found = os.lstat(target)
        except (ValueError, OSError):
            continue  # a torn last line, or never renamed
        if (found.st_dev, found.st_ino) != (int(dev), int(ino)):
            continue  # not this delivery's file (the rename never happened, or someone replaced it since)
        try:
            if backup and os.path.lexists(backup):
                os.replace(backup, target)
            else:
                os.unlink(target)
            taken.append(target)
        except OSError as exc:
            log.warning("could not take back %s: %s", target, exc.strerror or exc)
    shutil.rmtree(folder, ignore_errors=True)
    return taken


def already_there(existing: list[Path]) -> str:
    """``X already exists`` or ``X and N more already exist``, for outputs found on disk."""
    return f"{existing[0]} and {len(existing) - 1} more already exist" if len(existing) > 1 \
        else f"{existing[0]} already exists"


def real_paths(paths: list[Path]) -> list[Path]:
    """``[path.resolve() for path in paths]``, resolving each folder once: thousands of
    frames in one folder cost one walk of it, not one each."""
    folders: dict[Path, Path] = {}
    found = []
    for path in map(Path, paths):
        folder = folders.get(path.parent)
        if folder is None:
            folder = folders[path.parent] = path.parent.resolve()
        real = folder / path.name
        if os.path.islink(real):  # the name itself may be a link
            real = real.resolve()
        found.append(real)
    return found


def deliver(files: dict[Path, Path], job: Job, context: object = None, *, noun: str = "outputs") -> list[Path]:
    """Deliver finished files (``{target: source}``) all or nothing (see :class:`Delivery`);
    returns the delivered paths. ``context`` is the assemble step's
    :class:`~farm.processor.Context`, whose ``claim`` records the paths as this job's."""
    with Delivery(job, claim=getattr(context, "claim", None), noun=noun) as delivery:
        delivery.stage(files)
        return delivery.commit()


# -- leftovers -----------------------------------------------------------------------------------


def sweep(destination: Path, state_of: Callable[[str], str | None]) -> list[str]:
    """Remove from ``destination`` what deliveries of jobs no longer running left behind:
    staging folders (undoing a commit killed part-way, unless its job is ``done``) and
    temporary files (``.NAME.farm-*``). ``state_of(job_id)`` is the job's state, or None
    for a job this store does not know (another store's: left alone). Returns what was
    removed, as names relative to ``destination``."""
    from farm.model import TERMINAL_JOB_STATES

    removed: list[str] = []
    try:
        entries = list(os.scandir(destination))
    except OSError:
        return removed
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
            state = state_of(entry.name[len(STAGING_PREFIX):])
            if state is None or (state not in TERMINAL_JOB_STATES and state != "interrupted"):
                continue  # unknown to this store, or its owner may still be delivering
            taken = undo_staging(Path(entry.path), keep_delivered=state == "done")
            removed.append(entry.name + (f" (and the {len(taken)} file(s) it had delivered)" if taken else ""))
        elif is_temporary(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


__all__ = ["Delivery", "deliver", "output_path", "inside", "rename_noreplace", "staging_folder", "sweep",
           "undo_staging", "mib", "is_temporary", "real_paths", "STAGING_PREFIX"]
