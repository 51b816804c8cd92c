"""``load_model("braggnn-ensemble")``: the 5-member ensemble of reference BraggNNs (with the
non-local block), on request; the default ``braggnn`` is one lean network with a variance
head. Same ``predict`` contract (``models.braggnn.BraggNNPredictor``)."""

from .braggnn import load_ensemble as load

__all__ = ["load"]
