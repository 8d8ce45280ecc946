"""GRUCell and GRU: subclasses of the torch.nn twins (same constructor, defaults, parameters and state_dict keys)
whose forward runs pyattn's fused GRU ops, PackedSequence inputs included."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..ops.gru import gru_cell, gru_layer
from ._packed import PackedPlan


class GRUCell(nn.GRUCell):
    """torch.nn.GRUCell on pyattn's fused cell: input (B, I) or (I), hx (B, H) / (H) or None -> h' (B, H) / (H)."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRU(nn.Module):
    """torch.nn.GRU on pyattn's fused layer op (input projection hoisted, fused recurrence per direction).

    Same constructor, defaults, parameter names/order/initialisation and state_dict as torch.nn.GRU
    (num_layers, bias, batch_first, dropout between layers in training, bidirectional; unbatched input; h0
    optional). It is not a subclass of torch.nn.GRU on purpose: torch.compile refuses to trace RNNBase modules,
    while this one compiles with fullgraph=True.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}")
        # torch.nn.RNNBase's checks, in its order and with its texts
        for name, value in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError("num_layers must be an integer greater than zero")
        self.mode = "GRU"
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, 0
        kw = {"device": device, "dtype": dtype}
        dirs = 2 if bidirectional else 1
        for layer in range(num_layers):
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                in_size = input_size if layer == 0 else hidden_size * dirs
                self.register_parameter("weight_ih" + sfx, nn.Parameter(torch.empty(3 * hidden_size, in_size, **kw)))
                self.register_parameter("weight_hh" + sfx,
                                        nn.Parameter(torch.empty(3 * hidden_size, hidden_size, **kw)))
                if bias:
                    self.register_parameter("bias_ih" + sfx, nn.Parameter(torch.empty(3 * hidden_size, **kw)))
                    self.register_parameter("bias_hh" + sfx, nn.Parameter(torch.empty(3 * hidden_size, **kw)))
        self.reset_parameters()

    @property
    def _flat_weights(self) -> list[Tensor]:
        """Parameters in torch.nn.GRU's order (torch's shape/dtype checks read this)."""
        return list(self.parameters())

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    def forward(self, input, hx: Optional[Tensor] = None):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            if hx is not None and hx.dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
            input = input.unsqueeze(batch_dim)
            hx = None if hx is None else hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        # torch's own checks and texts (input size, dtype; hidden shape ignores batch_first)
        nn.RNNBase.check_input(self, input, None)
        if hx is not None:
            nn.RNNBase.check_hidden_size(self, hx, nn.RNNBase.get_expected_hidden_size(self, input, None))
        x = input.transpose(0, 1) if self.batch_first else input  # (T, B, I), a view
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        out, h_n = self._layers(x, hx, lambda layer_in, h0, w, reverse: gru_layer(layer_in, h0, *w, reverse=reverse))
        out = out.transpose(0, 1) if self.batch_first else out
        if not batched:
            return out.squeeze(batch_dim), h_n.squeeze(1)
        return out, h_n

    def _layers(self, x: Tensor, hx: Optional[Tensor], run) -> tuple[Tensor, Tensor]:
        """Every layer and direction: run(layer_in, h0 or None, (w_ih, w_hh, b_ih, b_hh), reverse) -> (out, h_last)
        with out's last dim H; the directions' outputs are concatenated on the last dim, dropout (training) between
        layers. Returns the last layer's output and h_n (num_layers * dirs, batch, H)."""
        dirs = 2 if self.bidirectional else 1
        layer_in = x
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                w = (getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx),
                     getattr(self, "bias_ih" + sfx, None), getattr(self, "bias_hh" + sfx, None))
                out, h_last = run(layer_in, None if hx is None else hx[layer * dirs + d], w, d == 1)
                outs.append(out)
                finals.append(h_last)
            layer_in = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)  # (..., dirs*H)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        return layer_in, torch.stack(finals, 0)

    def _forward_packed(self, input: PackedSequence, hx: Optional[Tensor]):
        """Variable-length sequences (torch's PackedSequence) on the same fused layer op, a few gru_layer calls
        per layer direction on views or padded groups of the packed rows (pyattn/nn/_packed.py)."""
        data, batch_sizes, sorted_indices, unsorted_indices = input
        if hx is not None and sorted_indices is not None:
            hx = hx.index_select(1, sorted_indices)  # torch's permute_hidden (and its checks after it)
        nn.RNNBase.check_input(self, data, batch_sizes)
        if hx is not None:
            nn.RNNBase.check_hidden_size(self, hx, nn.RNNBase.get_expected_hidden_size(self, data, batch_sizes))
        plan = PackedPlan(batch_sizes, data.device, PackedPlan.merge_rows_for(data.device), self.bidirectional)

        def run_layer(layer_in: Tensor, h0: Optional[Tensor], w, reverse: bool) -> tuple[Tensor, Tensor]:
            if h0 is None:
                h0 = torch.zeros(plan.batch, self.hidden_size, dtype=data.dtype, device=data.device)
            return plan.run(layer_in, h0, lambda x, h: gru_layer(x, h, *w), reverse)

        out, h_n = self._layers(data.contiguous(), hx, run_layer)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), h_n
