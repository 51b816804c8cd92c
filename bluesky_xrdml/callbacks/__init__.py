"""Document consumers: the routing/analysis callback."""

from .analyzers import BraggPeaks, RoiIntensities
from .integration import PowderIntegration
from .operando import OperandoAttention
from .registry import default_analyses
from .structure import StructureClassification
from .xrdml import XRDMLCallback

__all__ = ["BraggPeaks", "OperandoAttention", "PowderIntegration", "RoiIntensities",
           "StructureClassification", "XRDMLCallback", "default_analyses"]
