"""The functional API: torch.nn.functional-compatible entry points that dispatch to pyattn's backends."""
from .ops.layer_norm import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]
