"""LayerNorm, RMSNorm (torch.nn twins) and AddNorm, the fused residual + norm of the Transformer sub-layers."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import functional as F


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm running on pyattn's kernels. ``forward(x, residual=None)``: LN(x + residual)."""

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)


class RMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm running on pyattn's kernels. ``forward(x, residual=None)``: RMSNorm(x + residual)."""

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual)


class AddNorm(LayerNorm):
    """Add & Norm of the paper: ``forward(x, sublayer_out) = LayerNorm(x + sublayer_out)`` in one fused kernel.

    Same parameters and state_dict as torch.nn.LayerNorm, so it loads a Transformer layer's ``normN`` weights.
    ``return_residual=True`` also returns the sum (pre-norm stacks carry it to the next layer).
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, return_residual: bool = False):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual,
                            return_residual=return_residual)
