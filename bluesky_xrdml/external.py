"""Frames that live in files: the one place where external data are read.

Real area detectors rarely put frames in events. They write files and emit references:

- ophyd v1 ``resource`` + ``datum`` documents (the event holds a datum id; the data key
  says ``"external": "FILESTORE:"``), read with the community's handlers
  (``area-detector-handlers``: ``AD_HDF5``, ``AD_HDF5_SWMR``, ``AD_TIFF``; ophyd's
  ``NPY_SEQ``), registered by default and extendable by spec;
- ophyd-async ``stream_resource`` + ``stream_datum`` documents (the data key says
  ``"external": "STREAM:"``), read by mimetype (HDF5, TIFF sequences, and whatever is
  added with ``register_mimetype``).

``ExternalReader`` keeps the run's resources and datums and reads a frame when it is
asked for: on the analysis worker, never on the RunEngine's thread. Files that are
still being written (SWMR, a TIFF not yet flushed) are retried until ``timeout`` runs
out; anything that cannot be read raises ``ExternalDataError`` with a message that says
what to do. The 0MQ worker and the archive reader use the same class.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from urllib.parse import urlparse

import numpy as np


class ExternalDataError(RuntimeError):
    """External data that cannot be read: unknown spec or mimetype, missing or
    unflushed file, unknown datum. The message says which and what to do."""


def default_handlers() -> dict:
    """spec -> handler class: the community's area-detector handlers and ophyd's NPY_SEQ.

    HDF5 frames are read with area-detector-handlers' plain-numpy dataset handler (its
    default ``AD_HDF5`` handler wraps every frame in dask, and its ``AD_HDF5_SWMR``
    handler then fails on the second frame: a dask array has no ``.id.refresh()``)."""
    from area_detector_handlers.handlers import AreaDetectorTiffHandler
    from ophyd.sim import NumpySeqHandler

    return {"AD_HDF5": AreaDetectorHDF5, "AD_HDF5_SWMR": AreaDetectorHDF5SWMR,
            "AD_TIFF": AreaDetectorTiffHandler, "NPY_SEQ": NumpySeqHandler}


def _hdf5_base():
    from area_detector_handlers.handlers import HDF5DatasetSliceHandlerPureNumpy

    return HDF5DatasetSliceHandlerPureNumpy


class AreaDetectorHDF5(_hdf5_base()):
    """Spec ``AD_HDF5``: frames in ``/entry/data/data``; ``point_number`` × frames per point."""

    specs = {"AD_HDF5"}

    def __init__(self, filename, frame_per_point=1):
        super().__init__(filename=filename, key="/entry/data/data",
                         frame_per_point=frame_per_point)

    def __call__(self, point_number):
        frames = super().__call__(point_number)
        if len(frames) < self._fpp:  # numpy slicing past the end gives an empty array
            raise IndexError(f"frame {point_number} is not in {self._filename} yet "
                             f"({self._dataset.shape[0]} frames written)")
        return frames


class AreaDetectorHDF5SWMR(AreaDetectorHDF5):
    """Spec ``AD_HDF5_SWMR``: as ``AD_HDF5``, the file opened for SWMR reading and the
    dataset refreshed before every read (the detector is still writing it)."""

    specs = {"AD_HDF5_SWMR"}

    def open(self):
        if self._file:
            return
        import h5py

        self._file = h5py.File(self._filename, "r", swmr=True)

    def __call__(self, point_number):
        if self._dataset is not None:
            self._dataset.id.refresh()
        return super().__call__(point_number)


# --- stream_resource readers, by mimetype --------------------------------------------
def _path(uri: str) -> str:
    parsed = urlparse(uri)
    return parsed.path if parsed.scheme in ("file", "") else uri


def read_hdf5(resource: dict, start: int, stop: int) -> np.ndarray:
    """Frames ``start:stop`` of the resource's HDF5 dataset (opened SWMR, refreshed)."""
    import h5py

    path = _path(resource["uri"])
    params = resource.get("parameters") or {}
    dataset = params.get("dataset", "/entry/data/data")
    with h5py.File(path, "r", swmr=True, libver="latest") as f:
        ds = f[dataset]
        if ds.shape[0] < stop:
            raise ExternalDataError(
                f"{path}:{dataset} holds {ds.shape[0]} frames, frame {stop - 1} asked for "
                "(not flushed yet?)")
        return np.asarray(ds[start:stop])


def read_tiff_sequence(resource: dict, start: int, stop: int) -> np.ndarray:
    """Frames of a directory of TIFF files, one per frame: ``parameters["template"]``
    (e.g. ``"{:06d}.tiff"``, formatted with the frame index) inside the resource's URI."""
    import tifffile

    folder = _path(resource["uri"])
    template = (resource.get("parameters") or {}).get("template", "{:06d}.tiff")
    frames = []
    for i in range(start, stop):
        name = os.path.join(folder, template.format(i) if "{" in template else template % i)
        frames.append(tifffile.imread(name))
    return np.stack(frames)


MIMETYPES: dict[str, Callable] = {
    "application/x-hdf5": read_hdf5,
    "multipart/related;type=image/tiff": read_tiff_sequence,
    "image/tiff": read_tiff_sequence,
}


def register_mimetype(mimetype: str, reader: Callable) -> None:
    """Read stream_resources of ``mimetype`` with ``reader(resource, start, stop)``."""
    MIMETYPES[mimetype] = reader


# --- the reader ------------------------------------------------------------------------
RETRYABLE = (OSError, KeyError, IndexError, ValueError, ExternalDataError)


class ExternalReader:
    """Resolves a run's references to arrays. Feed it the run's documents (``consume``),
    then ``fill(datum_id)`` or ``read_stream_datum(doc)``.

    Parameters
    ----------
    handler_registry : dict, optional
        spec -> handler class, added to (and overriding) ``default_handlers()``.
    root_map : dict, optional
        Resource ``root`` -> where those files are on this machine; also applied to
        the path of a stream_resource's ``file:`` URI (the longest matching folder).
    timeout : float
        Seconds to keep retrying a read that fails as if the file were not written yet
        (missing, short, locked). A resource that timed out once is then tried only once
        per frame, so a missing file costs one timeout per run, not one per frame.
    """

    def __init__(self, handler_registry: dict | None = None, root_map: dict | None = None,
                 timeout: float = 10.0, retry_interval: float = 0.1):
        self._registry = dict(handler_registry or {})
        self._all_handlers: dict | None = None  # built at the first resource, on the worker
        self.root_map = dict(root_map or {})
        self.timeout, self.retry_interval = float(timeout), float(retry_interval)
        self.resources: dict[str, dict] = {}
        self.datums: dict[str, dict] = {}
        self.stream_resources: dict[str, dict] = {}
        self._handlers: dict[str, object] = {}
        self._timed_out: set[str] = set()

    @property
    def handlers(self) -> dict:
        """spec -> handler class: the defaults and ``handler_registry`` (imported lazily:
        area-detector-handlers pulls in dask, and a run is started on the RunEngine's
        thread)."""
        if self._all_handlers is None:
            self._all_handlers = {**default_handlers(), **self._registry}
        return self._all_handlers

    # --- documents ------------------------------------------------------------------
    def consume(self, name: str, doc: dict) -> bool:
        """Remember an external-data document; False for any other document."""
        if name == "resource":
            self.resources[doc["uid"]] = doc
        elif name == "datum":
            self.datums[doc["datum_id"]] = doc
        elif name == "datum_page":
            kwargs = doc.get("datum_kwargs") or {}
            for i, datum_id in enumerate(doc["datum_id"]):
                self.datums[datum_id] = {"datum_id": datum_id, "resource": doc["resource"],
                                         "datum_kwargs": {k: v[i] for k, v in kwargs.items()}}
        elif name == "stream_resource":
            self.stream_resources[doc["uid"]] = doc
        else:
            return False
        return True

    # --- resource / datum ------------------------------------------------------------
    def resource_path(self, resource: dict) -> str:
        root = resource.get("root", "") or ""
        root = self.root_map.get(root, root)
        path = resource["resource_path"]
        return os.path.join(root, path) if root else path

    def _handler(self, resource: dict):
        uid = resource["uid"]
        if uid not in self._handlers:
            spec = resource.get("spec")
            cls = self.handlers.get(spec)
            if cls is None:
                raise ExternalDataError(
                    f"no handler for spec {spec!r} (known: {', '.join(sorted(self.handlers))}); "
                    "pass handler_registry={spec: HandlerClass} to XRDMLCallback")
            self._handlers[uid] = cls(self.resource_path(resource),
                                      **(resource.get("resource_kwargs") or {}))
        return self._handlers[uid]

    def fill(self, datum_id: str, ndim: int | None = None) -> np.ndarray:
        """The array datum ``datum_id`` points to. Leading axes of length 1 (the handlers'
        frames-per-point axis) are dropped down to ``ndim`` dimensions (the data key's)."""
        datum = self.datums.get(datum_id)
        if datum is None:
            raise ExternalDataError(f"unknown datum {datum_id!r}: its datum document never "
                                    "arrived (subscribe the callback before the scan starts)")
        resource = self.resources.get(datum["resource"])
        if resource is None:
            raise ExternalDataError(f"datum {datum_id!r} refers to unknown resource "
                                    f"{datum['resource']!r}")
        spec = resource.get("spec")
        if spec not in self.handlers:
            self._handler(resource)  # raises with the list of known specs

        def read():
            try:
                return np.asarray(self._handler(resource)(**(datum.get("datum_kwargs") or {})))
            except Exception:
                self._drop(resource["uid"])  # reopen next time: the file may have grown
                raise

        where = f"{spec} file {self.resource_path(resource)}"
        return _squeeze(self._retry(resource["uid"], read, where), ndim)

    def _drop(self, uid: str) -> None:
        handler = self._handlers.pop(uid, None)
        close = getattr(handler, "close", None)
        if close:
            try:
                close()
            except Exception:
                pass

    # --- stream_resource / stream_datum ------------------------------------------------
    def map_path(self, path: str) -> str:
        """``path`` with its longest ``root_map`` folder replaced by where it is here."""
        for old in sorted(self.root_map, key=len, reverse=True):
            base = old.rstrip("/")
            if path == base or path.startswith(base + "/"):
                return self.root_map[old].rstrip("/") + path[len(base):]
        return path

    def mapped_stream_resource(self, resource: dict) -> dict:
        """The stream_resource with its ``file:`` URI moved by ``root_map``."""
        uri = resource.get("uri", "")
        parsed = urlparse(uri)
        if not self.root_map or parsed.scheme not in ("file", ""):
            return resource
        mapped = self.map_path(parsed.path)
        if mapped == parsed.path:
            return resource
        return {**resource, "uri": f"file://{parsed.netloc}{mapped}" if parsed.scheme
                else mapped}

    def read_stream_datum(self, datum: dict) -> tuple[str, range, np.ndarray]:
        """``(data key, seq_nums, arrays)`` of a stream_datum: one array per event."""
        resource = self.stream_resources.get(datum["stream_resource"])
        if resource is None:
            raise ExternalDataError(f"stream_datum refers to unknown stream_resource "
                                    f"{datum['stream_resource']!r}")
        mimetype = resource.get("mimetype", "")
        reader = MIMETYPES.get(mimetype)
        if reader is None:
            raise ExternalDataError(
                f"external data of type {mimetype!r} cannot be read (known: "
                f"{', '.join(sorted(MIMETYPES))}); add a reader with "
                "bluesky_xrdml.external.register_mimetype")
        resource = self.mapped_stream_resource(resource)
        seqs = range(datum["seq_nums"]["start"], datum["seq_nums"]["stop"])
        mult = int((resource.get("parameters") or {}).get("multiplier", 1) or 1)
        start, stop = datum["indices"]["start"] * mult, datum["indices"]["stop"] * mult
        arrays = self._retry(resource["uid"], lambda: reader(resource, start, stop),
                             f"{mimetype} {resource.get('uri')}")
        if mult > 1:
            arrays = arrays.reshape(len(seqs), mult, *arrays.shape[1:]).sum(axis=1)
        return resource["data_key"], seqs, arrays

    # --- retries -------------------------------------------------------------------------
    def _retry(self, uid: str, read: Callable, where: str):
        deadline = time.monotonic() + (0.0 if uid in self._timed_out else self.timeout)
        while True:
            try:
                return read()
            except RETRYABLE as err:
                if time.monotonic() >= deadline:
                    self._timed_out.add(uid)
                    raise ExternalDataError(
                        f"could not read {where} ({type(err).__name__}: {err}) within "
                        f"{self.timeout:g} s; check that the file exists and is reachable "
                        "from here (root_map=; xrdml worker --root-map) and was flushed") from None
                time.sleep(self.retry_interval)
            except Exception as err:
                raise ExternalDataError(f"could not read {where}: {type(err).__name__}: "
                                        f"{err}") from None

    def close(self) -> None:
        for uid in list(self._handlers):
            self._drop(uid)


def _squeeze(arr, ndim: int | None) -> np.ndarray:
    arr = np.asarray(arr)
    ndim = 2 if ndim is None else ndim
    while arr.ndim > ndim and arr.shape[0] == 1:
        arr = arr[0]
    return arr
