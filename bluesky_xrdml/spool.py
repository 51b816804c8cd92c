"""What our writers keep on disk until the catalog holds a run: nothing lost, flat memory.

``SpooledWriter`` gives every run its own writer (a ``TiledWriter`` made by ``make``)
through event-model's ``RunRouter``, and appends each document of the run to a spool
file as it passes. When the run is filed (its stop document written) the file is
deleted; when a write fails, the run's writer is abandoned (nothing more is sent to
the catalog for that run, so a partial copy never gets a stop document), the rest of
the run still goes to the file, and at the stop the file is kept for ``xrdml sync``.

Why not ``TiledWriter(backup_directory=...)``: its backup keeps every document of the
run in memory until the stop (up to a million), which grows without bound in a scan
that runs for days, and its JSON backup needs arrays turned into Python lists first
(~18x the bytes; seconds per 2048² frame). Here documents go to the writer as they
came (arrays as arrays) and to the file as msgpack (arrays as raw bytes,
``remote.pack``): memory stays flat, the disk holds one copy of the run in progress.

Files: ``<directory>/<uid prefix>.msgpack.open`` while the run is written, renamed
``<uid prefix>.msgpack`` when the run must be synced. An ``.open`` file left behind
means the writing process ended mid-run: ``sync`` reports it and leaves it alone (it
could still be written to); rename it to ``.msgpack`` to file what it holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgpack
from event_model import RunRouter

from .remote import _ext_hook, pack

logger = logging.getLogger(__name__)

SUFFIX = ".msgpack"
OPEN = ".msgpack.open"


class SpooledWriter:
    """A RunEngine/analysis callback: ``make()`` builds a writer per run (e.g. a
    ``TiledWriter``); every document is also spooled to ``directory`` until its run
    is filed. ``spooled`` lists ``(uid, path)`` of the runs left for ``xrdml sync``."""

    def __init__(self, make, directory, what: str = "run"):
        self.make, self.directory, self.what = make, Path(directory), what
        self.spooled: list[tuple[str, Path]] = []
        # RunRouter fills external data by default (a copy of each event); a writer files
        # the references, not the data, so documents pass through untouched
        self._router = RunRouter([self._factory], filler_class=_Unfilled)

    def __call__(self, name, doc):
        self._router(name, doc)

    def _factory(self, name, start):
        return [_RunSpool(self, start)], []


class _Unfilled:
    """A ``Filler`` stand-in for ``RunRouter`` that hands every document on as it is."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda doc, *args, **kwargs: doc


class _RunSpool:
    """One run: to its writer while that works, to the spool file always."""

    def __init__(self, owner: SpooledWriter, start: dict):
        self.owner, self.uid = owner, start["uid"]
        owner.directory.mkdir(parents=True, exist_ok=True)
        self.path = owner.directory / f"{self.uid.split('-')[0]}{OPEN}"
        self.file = open(self.path, "ab")
        self.writer = None
        self.failed = ""
        try:
            self.writer = owner.make()
        except Exception as err:
            self.failed = f"{type(err).__name__}: {err}"

    def __call__(self, name, doc):
        self.file.write(pack({"name": name, "doc": doc}))
        if not self.failed:
            try:
                self.writer(name, doc)
            except Exception as err:
                self.failed = f"{type(err).__name__}: {err}"
                logger.error("%s %s: writing a %r document to the catalog failed (%s); the "
                             "rest of the run goes only to the spool", self.owner.what,
                             self.uid, name, self.failed,
                             exc_info=logger.isEnabledFor(logging.DEBUG))
        if name == "stop":
            self.close()

    def close(self) -> None:
        self.file.close()
        if not self.failed:
            self.path.unlink()
            return
        kept = self.path.with_name(self.path.name.removesuffix(".open"))
        self.path.rename(kept)
        self.owner.spooled.append((self.uid, kept))
        logger.warning("%s %s could not be filed in the catalog (%s); all its documents are "
                       "in %s: file them with `xrdml sync --spool %s` once the catalog is "
                       "reachable", self.owner.what, self.uid, self.failed, kept,
                       kept.parent.parent)


def documents(path: Path):
    """The ``{"name", "doc"}`` records of a spool file, one at a time: msgpack files
    written here, or JSON lines (TiledWriter's own backup, older versions of ours)."""
    path = Path(path)
    if path.name.endswith(".jsonl"):
        import json

        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    with open(path, "rb") as f:
        yield from msgpack.Unpacker(f, ext_hook=_ext_hook, raw=False, strict_map_key=False,
                                    max_buffer_size=0)


def pending(directory: Path) -> list[Path]:
    """Spool files waiting for ``sync`` in ``directory``, oldest first."""
    directory = Path(directory)
    files = list(directory.glob(f"*{SUFFIX}")) + list(directory.glob("*.jsonl"))
    return sorted(files, key=lambda p: p.stat().st_mtime)


def left_open(directory: Path) -> list[Path]:
    """Spool files of runs still being written, or whose writer died mid-run."""
    return sorted(Path(directory).glob(f"*{OPEN}"))
