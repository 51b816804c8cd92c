"""Document consumers: the routing/analysis callback."""

from .analyzers import BraggPeaks, RoiIntensities, default_analyses
from .integration import PowderIntegration
from .operando import OperandoAttention
from .xrdml import XRDMLCallback

__all__ = ["BraggPeaks", "OperandoAttention", "PowderIntegration", "RoiIntensities",
           "XRDMLCallback", "default_analyses"]
