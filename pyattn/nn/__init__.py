"""Drop-in modules: same constructor arguments, defaults and state_dict keys as their torch.nn twins."""
from .normalization import AddNorm, LayerNorm, RMSNorm

__all__ = ["AddNorm", "LayerNorm", "RMSNorm"]
