"""The analyses ``XRDMLCallback`` runs: every one by default, or those named."""

from __future__ import annotations

from .analyzers import BraggPeaks, RoiIntensities
from .phases import PhaseQuantification


def default_analyses(rois=None, phases=None, models: dict | None = None) -> list:
    """Every analysis available: Bragg peaks on frames; ROI intensities and PQ-Net phase
    quantification on patterns (PQ-Net where the pattern's 2θ grid and wavelength are the
    model's).

    ``models`` maps a model name to your own weights file, e.g.
    ``{"braggnn": "my-braggnn.safetensors"}``; shipped weights otherwise.
    """
    models = dict(models or {})
    if "pqnet" in models:  # a model trained with `xrdml train pqnet` says "pqnet"
        models["pqnet-demo"] = models.pop("pqnet")
    unknown = set(models) - {"braggnn", "pqnet-demo"}
    if unknown:
        raise ValueError(f"no analysis uses model(s) {sorted(unknown)}; "
                         "known: braggnn, pqnet (or pqnet-demo)")
    return [BraggPeaks(weights=models.get("braggnn")),
            RoiIntensities(rois=rois, phases=phases),
            PhaseQuantification(weights=models.get("pqnet-demo"))]


# analysis name -> factory: what ``XRDMLCallback(analyses=["roi", ...])`` can name
ANALYSES: dict = {"bragg-peaks": BraggPeaks, "roi": RoiIntensities, "pqnet": PhaseQuantification}


def register_analysis(name: str, factory) -> None:
    """Let ``XRDMLCallback(analyses=[name])`` build an analysis with ``factory()``."""
    ANALYSES[name] = factory


def resolve_analyses(analyses) -> list:
    """Analysis objects from objects or names (``["bragg-peaks", "roi"]``); a name nobody
    registered, or an object that is not an analysis, is refused with the valid names."""
    if isinstance(analyses, str | bytes):
        analyses = [analyses]
    out = []
    for a in analyses:
        if isinstance(a, str):
            if a not in ANALYSES:
                raise ValueError(f"unknown analysis {a!r}; available: {', '.join(ANALYSES)} "
                                 "(or pass analysis objects, e.g. RoiIntensities(rois=...))")
            a = ANALYSES[a]()
        missing = [m for m in ("match", "streams", "analyze", "finish") if not hasattr(a, m)]
        if missing or not hasattr(a, "name"):
            raise TypeError(f"{a!r} is not an analysis (it lacks {missing or ['name']}); "
                            f"pass analysis objects or names: {', '.join(ANALYSES)}")
        out.append(a)
    return out
