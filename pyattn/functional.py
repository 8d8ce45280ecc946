"""The functional API: torch.nn.functional-compatible entry points that dispatch to pyattn's backends."""
from .ops.layer_norm import layer_norm, rms_norm
from .ops.attention import flash_attn_func, scaled_dot_product_attention
from .ops.gru import gru_cell

__all__ = ["layer_norm", "rms_norm"]
__all__ += ["flash_attn_func", "scaled_dot_product_attention", "gru_cell"]
