"""Document consumers: the routing/analysis callback."""

from .analyzers import BraggPeaks, RoiIntensities, default_analyses
from .integration import PowderIntegration
from .operando import OperandoAttention
from .structure import StructureClassification
from .xrdml import XRDMLCallback

__all__ = ["BraggPeaks", "OperandoAttention", "PowderIntegration", "RoiIntensities",
           "StructureClassification", "XRDMLCallback", "default_analyses"]
