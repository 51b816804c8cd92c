"""Simulated detectors that write their frames to files, as real area detectors do.

An ophyd v1 AreaDetector with an HDF5 file plugin writes every frame into
``/entry/data/data`` of an HDF5 file and emits one ``resource`` document (spec
``AD_HDF5`` or ``AD_HDF5_SWMR``) per file and one ``datum`` per frame; the event holds
the datum id, and the data key says ``"external": "FILESTORE:"``. ``HDF5AreaDetector``
does exactly that with the Bragg-spot simulation, so the path a user sees first in the
demo is the real one, and ``HDF5Writer`` lends the same behaviour to any frame source.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections import deque
from pathlib import Path

import numpy as np
from event_model import compose_resource
from ophyd import Component as Cpt

from .area import BraggSpotDetector
from .signals import ArraySignal

DATASET = "/entry/data/data"  # where the AreaDetector HDF5 plugin puts frames


class ExternalArraySignal(ArraySignal):
    """An array signal whose reading is a datum id: the frame itself is in a file."""

    def describe(self):
        desc = super().describe()
        desc[self.name]["external"] = "FILESTORE:"
        return desc


class HDF5Writer:
    """Appends frames to one HDF5 file per run (SWMR: readable while it grows) and
    composes the resource and datum documents that point to them."""

    def __init__(self, directory, spec: str = "AD_HDF5_SWMR", prefix: str = "frames"):
        self.directory = Path(directory)
        self.spec, self.prefix = spec, prefix
        self._file = None
        self._bundle = None
        self._index = itertools.count()
        self._assets: deque = deque()
        self.path: Path | None = None

    def open(self, shape, dtype) -> None:
        import h5py

        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{self.prefix}_{uuid.uuid4().hex[:12]}.h5"
        self._file = h5py.File(self.path, "w", libver="latest")
        self._dataset = self._file.create_dataset(
            DATASET, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
            chunks=(1, *shape))
        self._file.swmr_mode = True
        self._bundle = compose_resource(
            spec=self.spec, root=str(self.directory), resource_path=self.path.name,
            resource_kwargs={"frame_per_point": 1}, start={"uid": "replaced below"})
        resource = dict(self._bundle.resource_doc)
        resource.pop("run_start", None)  # the RunEngine fills in the run
        self._assets.append(("resource", resource))
        self._index = itertools.count()

    def write(self, frame: np.ndarray) -> str:
        """Append ``frame``, flush it, and return the id of the datum that points to it."""
        i = next(self._index)
        self._dataset.resize(i + 1, axis=0)
        self._dataset[i] = frame
        self._dataset.flush()
        datum = self._bundle.compose_datum(datum_kwargs={"point_number": i})
        self._assets.append(("datum", datum))
        return datum["datum_id"]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def collect_asset_docs(self):
        while self._assets:
            yield self._assets.popleft()


class HDF5AreaDetector(BraggSpotDetector):
    """``BraggSpotDetector`` whose frames go to an HDF5 file, as with an AreaDetector's
    HDF5 plugin: events carry datum ids, ``resource``/``datum`` documents say where the
    frames are. ``directory`` is where the files go (default ``$XRDML_DATA/frames`` or
    ``./xrdml-data/frames``)."""

    image = Cpt(ExternalArraySignal, kind="normal", shape=(1, 1), dtype="<u2")

    def __init__(self, *args, directory=None, spec: str = "AD_HDF5_SWMR", **kwargs):
        directory = directory or Path(os.environ.get("XRDML_DATA", "xrdml-data")) / "frames"
        self.writer = HDF5Writer(directory, spec=spec, prefix=kwargs.get("name", "frames"))
        super().__init__(*args, **kwargs)

    def stage(self):
        staged = super().stage()
        self.writer.open(self.simulator.shape, np.uint16)
        return staged

    def unstage(self):
        self.writer.close()
        return super().unstage()

    def trigger(self):
        status = super().trigger()
        frame = np.asarray(self.image.get())
        self.image.put(self.writer.write(frame))
        return status

    def collect_asset_docs(self):
        yield from self.writer.collect_asset_docs()


class StreamHDF5Detector:
    """An ophyd-async-style detector for step scans: frames of ``source()`` go to one HDF5
    file per run; it emits one ``stream_resource`` and a ``stream_datum`` per frame (the
    RunEngine fills in descriptor and seq_nums), and its events carry no frame at all.
    Implements the bluesky protocols directly (Readable, Triggerable, Stageable,
    WritesStreamAssets)."""

    def __init__(self, name: str, source, shape, directory, dtype="<u2"):
        self.name, self.parent = name, None
        self.source, self.shape, self.dtype = source, tuple(shape), np.dtype(dtype)
        self.directory = Path(directory)
        self.key = f"{name}_image"
        self._file = self._bundle = None
        self._index = 0
        self._assets: deque = deque()

    def describe(self):
        return {self.key: {"source": f"file:{self.directory}", "dtype": "array",
                           "shape": [1, *self.shape], "dtype_numpy": self.dtype.str,
                           "external": "STREAM:"}}

    def read(self):
        return {}

    def stage(self):
        import h5py
        from event_model import compose_stream_resource

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.name}_{uuid.uuid4().hex[:12]}.h5"
        self._file = h5py.File(path, "w", libver="latest")
        self._dataset = self._file.create_dataset(
            DATASET, shape=(0, *self.shape), maxshape=(None, *self.shape), dtype=self.dtype,
            chunks=(1, *self.shape))
        self._file.swmr_mode = True
        self._bundle = compose_stream_resource(
            mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key=self.key,
            parameters={"dataset": DATASET, "swmr": True})
        self._assets.append(("stream_resource", self._bundle.stream_resource_doc))
        self._index = 0
        return [self]

    def unstage(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        return [self]

    def trigger(self):
        from ophyd.sim import NullStatus

        frame = np.asarray(self.source(), self.dtype)
        self._dataset.resize(self._index + 1, axis=0)
        self._dataset[self._index] = frame
        self._dataset.flush()
        self._assets.append(("stream_datum", self._bundle.compose_stream_datum(
            indices={"start": self._index, "stop": self._index + 1},
            seq_nums={"start": 0, "stop": 0})))
        self._index += 1
        return NullStatus()

    def get_index(self) -> int:
        return self._index

    def collect_asset_docs(self, index=None):
        while self._assets:
            yield self._assets.popleft()
