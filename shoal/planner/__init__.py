"""shoal planner: predict throughput, latency and cost of serving a model on an accelerator.

Pure Python (imports only `shoal.config` from shoal, never torch). Entry points:
`shoal.planner.cli.main` / `python -m shoal.planner`, and the library pieces below.
"""

from .chips import Catalog, Chip, UnknownValue
from .cost import Layout, Predictor, Unpredictable
from .model import ModelSpec

__all__ = ["Catalog", "Chip", "Layout", "ModelSpec", "Predictor", "UnknownValue", "Unpredictable"]
