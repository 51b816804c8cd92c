"""Document consumers: the routing/analysis callback."""

from .analyzers import BraggPeaks, RoiIntensities, default_analyses
from .xrdml import XRDMLCallback

__all__ = ["BraggPeaks", "RoiIntensities", "XRDMLCallback", "default_analyses"]
