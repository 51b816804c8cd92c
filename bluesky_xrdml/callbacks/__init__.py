"""Document consumers: the routing/analysis callback."""

from .analyzers import BraggPeaks, RoiIntensities, default_analyses
from .structure import StructureClassification
from .xrdml import XRDMLCallback

__all__ = ["BraggPeaks", "RoiIntensities", "StructureClassification", "XRDMLCallback",
           "default_analyses"]
