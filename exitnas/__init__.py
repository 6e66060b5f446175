"""exitnas: search, train and export early-exit neural networks under a cost budget (MACs, ms)."""
from .arch import Arch, Exit, sample_arch
from .cost import CostTable, cost_table
from .errors import ExitnasError
from .model import MultiExitModel, Prediction
from .space import Space, load_space
from .supernet import Supernet, build_model

__version__ = "0.1.0"

__all__ = ["Arch", "Exit", "sample_arch", "CostTable", "cost_table", "ExitnasError",
           "MultiExitModel", "Prediction", "Space", "load_space", "Supernet", "build_model",
           "__version__"]
