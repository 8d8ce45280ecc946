"""The Transformer of "Attention Is All You Need" on pyattn's kernels: drop-in twins of torch.nn.Transformer,
TransformerEncoder, TransformerDecoder, TransformerEncoderLayer and TransformerDecoderLayer.

Same constructor arguments and defaults, same forward signatures (masks, key padding masks, ``is_causal`` hints),
same submodule and parameter names (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1..3``,
``layers.N``, ``encoder.norm`` ...), so a torch.nn checkpoint loads with ``strict=True`` in both directions and
gives the same outputs. What runs underneath:

* attention: ``pyattn.nn.MultiheadAttention`` (called with ``need_weights=False``), i.e.
  ``pyattn.scaled_dot_product_attention`` on the selected backend;
* each residual connection and its LayerNorm ("Add & Norm"): one fused ``pyattn.layer_norm(x, residual=...)`` call
  through ``pyattn.nn.AddNorm`` modules named ``norm1``/``norm2``/``norm3`` (AddNorm has LayerNorm's parameters
  and state_dict). Post-norm (the paper, the default): ``x = norm(x + sublayer(x))`` is one op. Pre-norm
  (``norm_first=True``): ``x = x + sublayer(norm(x))``; the sum after one sub-layer and the norm before the next
  are one op (``return_residual=True`` hands back both), only the last sum of a layer is a plain add.
* the feed-forward block: ``nn.Linear`` -> activation -> ``nn.Dropout`` -> ``nn.Linear`` (torch's own GEMMs).

Differences from torch.nn, by design:

* No fast path: torch's ``TransformerEncoderLayer`` switches to ``torch._transformer_encoder_layer_fwd`` (and
  ``TransformerEncoder`` to nested tensors) in some inference settings. These modules always run pyattn's ops.
  ``enable_nested_tensor`` is accepted and ignored (``use_nested_tensor`` is always False, without torch's
  warning), and nested-tensor inputs are refused with a ValueError. In eval mode with a key padding mask torch's
  nested fast path writes 0 at padded positions; these modules (like torch's own slow path) return the
  computed values there: only non-padded positions are meaningful in either.
* The modules are plain ``nn.Module``s, not subclasses of their torch.nn twins.
* bool masks stay bool down to the kernels (torch converts them to float -inf masks first); the results are the
  same. Where the two masks of one attention have different dtypes, torch's deprecation warning is raised and the
  bool one is converted, as torch does.
* Dropout: same places and probabilities as torch; the attention-dropout random stream is pyattn's own, so with
  ``dropout > 0`` outputs equal torch's only in distribution (``torch.manual_seed`` makes them reproducible).
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import xavier_uniform_

from .activation import MultiheadAttention
from .normalization import AddNorm, LayerNorm

__all__ = ["Transformer", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
           "TransformerDecoderLayer"]


# ---- helpers (torch's semantics and texts) ------------------------------------------------------------------

def _generate_square_subsequent_mask(sz: int, device: Optional[torch.device] = None,
                                     dtype: Optional[torch.dtype] = None) -> Tensor:
    """(sz, sz) float mask: -inf above the diagonal (future positions), 0 elsewhere."""
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), diagonal=1)


def _get_seq_len(src: Tensor, batch_first: bool) -> Optional[int]:
    if src.dim() == 2:  # unbatched: (S, E)
        return src.shape[0]
    return src.shape[1 if batch_first else 0]  # (B, S, E) or (S, B, E)


def _detect_is_causal_mask(mask: Optional[Tensor], is_causal: Optional[bool] = None,
                           size: Optional[int] = None) -> bool:
    """torch's rule: an explicit ``is_causal`` is returned as is; ``None`` with a mask: is the mask exactly the
    (size, size) causal mask of its own dtype (bool: True above the diagonal; float: -inf above, 0 elsewhere)?"""
    make_causal = is_causal is True
    if is_causal is None and mask is not None:
        sz = size if size is not None else mask.size(-2)
        causal = _generate_square_subsequent_mask(sz, device=mask.device, dtype=mask.dtype)
        make_causal = mask.size() == causal.size() and bool((mask == causal).all())
    return make_causal


def _get_activation_fn(activation: str) -> Callable[[Tensor], Tensor]:
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    raise RuntimeError(f"activation should be relu/gelu, not {activation}")


def _get_clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _reject_nested(t: Tensor, name: str) -> None:
    if isinstance(t, Tensor) and t.is_nested:
        raise ValueError(f"pyattn Transformer modules take no nested tensors ({name} is nested): they have no "
                         "nested-tensor fast path; pass a padded tensor and a key padding mask instead")


def _check_mask_pair(kpm: Optional[Tensor], kpm_name: str, mask: Optional[Tensor], mask_name: str,
                     dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """torch's ``_canonical_mask`` checks for a key padding mask and an attention mask (same exception and
    warning texts), without torch's bool -> float conversion: bool masks stay bool (True = masked) unless the
    two masks' dtypes differ, where the bool one becomes a float -inf mask of ``dtype`` as in torch."""
    for m, name in ((kpm, kpm_name), (mask, mask_name)):
        if m is not None and m.dtype != torch.bool and not torch.is_floating_point(m):
            raise AssertionError(f"only bool and floating types of {name} are supported")
    if kpm is not None and mask is not None and kpm.dtype != mask.dtype:
        warnings.warn(f"Support for mismatched {kpm_name} and {mask_name} is deprecated. Use same type for both "
                      "instead.", stacklevel=3)

        def to_float(m: Tensor) -> Tensor:
            return torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf")) if m.dtype == torch.bool else m
        kpm, mask = to_float(kpm), to_float(mask)
    return kpm, mask


def _add_norm(norm: nn.Module, x: Tensor, sub: Tensor, return_residual: bool = False):
    """Add & Norm: ``norm(x + sub)`` as one fused op when ``norm`` is pyattn's AddNorm (what the layers build);
    any other module put in its place (e.g. a torch.nn.LayerNorm swapped in by a user) gets the plain sum.
    With ``return_residual`` also returns ``x + sub``."""
    if isinstance(norm, AddNorm):
        return norm(x, sub, return_residual=return_residual)
    s = x + sub
    return (norm(s), s) if return_residual else norm(s)


# ---- layers --------------------------------------------------------------------------------------------------

class TransformerEncoderLayer(nn.Module):
    r"""torch.nn.TransformerEncoderLayer on pyattn's ops: self-attention, then a feed-forward network, each with a
    residual connection and LayerNorm (Add & Norm).

    Args (as torch.nn.TransformerEncoderLayer):
        d_model: the number of expected features in the input (required).
        nhead: the number of heads in the multi-head attention (required).
        dim_feedforward: the dimension of the feed-forward network (default 2048).
        dropout: the dropout value (default 0.1).
        activation: "relu", "gelu" or a unary callable (default relu).
        layer_norm_eps: the eps of the LayerNorms (default 1e-5).
        batch_first: (batch, seq, feature) inputs and outputs when True, else (seq, batch, feature) (default False).
        norm_first: pre-norm (LayerNorm before each sub-layer) when True, else post-norm as in the paper (default).
        bias: if False, the Linear and LayerNorm layers learn no additive bias (default True).

    Submodules and state_dict keys are torch's: ``self_attn`` (pyattn.nn.MultiheadAttention), ``linear1``,
    ``dropout``, ``linear2``, ``norm1``, ``norm2`` (pyattn.nn.AddNorm: LayerNorm's parameters, used as fused
    Add & Norm), ``dropout1``, ``dropout2``. There is no fast path (see the module docstring): every call runs
    pyattn's attention and fused Add & Norm.
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        # Construction order (hence the random init under a given seed) is torch's.
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            **factory_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = AddNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm2 = AddNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        if isinstance(activation, str):
            activation = _get_activation_fn(activation)
        # kept for attribute compatibility with torch (its fast path reads it; ours has none)
        if activation is F.relu or isinstance(activation, nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0
        self.activation = activation

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "activation"):
            self.activation = F.relu

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        r"""src: (S, E) unbatched, (S, N, E), or (N, S, E) with batch_first. src_mask: (S, S) or (N * nhead, S, S),
        bool (True = not allowed to attend) or float (added to the logits). src_key_padding_mask: (S) or (N, S),
        bool (True = padding, ignored) or float. is_causal: a hint that src_mask is the causal mask (then, with no
        key padding mask, the mask is not read and causal attention runs instead, as in torch)."""
        _reject_nested(src, "src")
        src_key_padding_mask, src_mask = _check_mask_pair(src_key_padding_mask, "src_key_padding_mask", src_mask,
                                                          "src_mask", src.dtype)
        x = src
        if self.norm_first:
            a = self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            h, x = _add_norm(self.norm2, x, a, return_residual=True)  # h = norm2(x + a), x = x + a
            return x + self._ff_block(h)
        x = _add_norm(self.norm1, x, self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return _add_norm(self.norm2, x, self._ff_block(x))

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool = False) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)


class TransformerDecoderLayer(nn.Module):
    r"""torch.nn.TransformerDecoderLayer on pyattn's ops: masked self-attention, cross-attention over the encoder
    output (memory), then a feed-forward network, each with Add & Norm.

    Same arguments as :class:`TransformerEncoderLayer`. Submodules and state_dict keys are torch's: ``self_attn``,
    ``multihead_attn`` (pyattn.nn.MultiheadAttention), ``linear1``, ``dropout``, ``linear2``, ``norm1``, ``norm2``,
    ``norm3`` (pyattn.nn.AddNorm), ``dropout1``, ``dropout2``, ``dropout3``.
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first, bias=bias,
                                            **factory_kwargs)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first,
                                                 bias=bias, **factory_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = AddNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm2 = AddNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm3 = AddNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation) if isinstance(activation, str) else activation

    def __setstate__(self, state):
        if "activation" not in state:
            state["activation"] = F.relu
        super().__setstate__(state)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        r"""tgt: (T, E), (T, N, E) or (N, T, E) with batch_first; memory: (S, E), (S, N, E) or (N, S, E).
        tgt_mask: (T, T) or (N * nhead, T, T); memory_mask: (T, S) or (N * nhead, T, S); key padding masks (N, T)
        and (N, S) ((T) and (S) unbatched); bool masks: True = not allowed to attend; float masks are added.
        tgt_is_causal / memory_is_causal: hints that the matching mask is causal (top-left aligned)."""
        _reject_nested(tgt, "tgt")
        _reject_nested(memory, "memory")
        x = tgt
        if self.norm_first:
            a = self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            h, x = _add_norm(self.norm2, x, a, return_residual=True)  # h = norm2(x + a), x = x + a
            a = self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = _add_norm(self.norm3, x, a, return_residual=True)
            return x + self._ff_block(h)
        x = _add_norm(self.norm1, x, self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = _add_norm(self.norm2, x,
                      self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        return _add_norm(self.norm3, x, self._ff_block(x))

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool = False) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                           need_weights=False)[0]
        return self.dropout1(x)

    def _mha_block(self, x: Tensor, mem: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                   is_causal: bool = False) -> Tensor:
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout3(x)


# ---- stacks --------------------------------------------------------------------------------------------------

class TransformerEncoder(nn.Module):
    r"""torch.nn.TransformerEncoder: ``num_layers`` deep copies of ``encoder_layer`` (state_dict keys
    ``layers.N.*``), then the optional ``norm``.

    ``enable_nested_tensor`` is accepted for signature compatibility and ignored: there is no nested-tensor fast
    path (``use_nested_tensor`` is always False, so torch's "enable_nested_tensor is True, but ..." warning is not
    raised either). ``mask_check`` is stored (torch uses it only on that fast path).
    """

    __constants__ = ["norm"]

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = False  # never: no nested-tensor fast path
        self.mask_check = mask_check

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        r"""Pass the input through the layers in turn (shapes as :class:`Transformer`). ``is_causal=None`` (the
        default) detects whether ``mask`` is exactly the causal mask, as torch does, and then lets the layers run
        causal attention without reading the mask."""
        _reject_nested(src, "src")
        src_key_padding_mask, mask = _check_mask_pair(src_key_padding_mask, "src_key_padding_mask", mask, "mask",
                                                      src.dtype)
        batch_first = self.layers[0].self_attn.batch_first
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, batch_first))
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    r"""torch.nn.TransformerDecoder: ``num_layers`` deep copies of ``decoder_layer`` (``layers.N.*``), then the
    optional ``norm``."""

    __constants__ = ["norm"]

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        r"""Pass the inputs through the layers in turn (shapes as :class:`Transformer`); ``tgt_is_causal=None``
        detects a causal ``tgt_mask`` as torch does."""
        _reject_nested(tgt, "tgt")
        seq_len = _get_seq_len(tgt, self.layers[0].self_attn.batch_first)
        tgt_is_causal = _detect_is_causal_mask(tgt_mask, tgt_is_causal, seq_len)
        output = tgt
        for mod in self.layers:
            output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        if self.norm is not None:
            output = self.norm(output)
        return output


class Transformer(nn.Module):
    r"""torch.nn.Transformer on pyattn's ops: an encoder (``encoder``: TransformerEncoder with a final LayerNorm
    ``encoder.norm``) and a decoder (``decoder``, ``decoder.norm``), post-norm by default as in the paper.

    Args (as torch.nn.Transformer): d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
    dim_feedforward=2048, dropout=0.1, activation=relu ("relu", "gelu" or a callable), custom_encoder=None,
    custom_decoder=None, layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device, dtype.
    Parameters with more than one dimension are initialised with ``xavier_uniform_`` as in torch, in the same
    order, so under the same seed both build the same weights.

    Shapes (forward): src (S, E) / (S, N, E) / (N, S, E) with batch_first; tgt (T, E) / (T, N, E) / (N, T, E);
    src_mask (S, S) or (N * nhead, S, S); tgt_mask (T, T) or (N * nhead, T, T); memory_mask (T, S) or
    (N * nhead, T, S); key padding masks (N, S), (N, T), (N, S) ((S), (T), (S) unbatched). bool masks: True = not
    allowed to attend (torch.nn's convention, the opposite of SDPA's); float masks are added to the logits.
    Output: (T, E) / (T, N, E) / (N, T, E).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, custom_encoder: Optional[Any] = None,
                 custom_decoder: Optional[Any] = None, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                    layer_norm_eps, batch_first, norm_first, bias, **factory_kwargs)
            encoder_norm = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                    layer_norm_eps, batch_first, norm_first, bias, **factory_kwargs)
            decoder_norm = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, decoder_norm)
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None,
                tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, src_is_causal: Optional[bool] = None,
                tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False) -> Tensor:
        r"""Encode ``src``, decode ``tgt`` against it (see the class docstring for shapes and masks).
        ``src_is_causal`` / ``tgt_is_causal``: hints that the mask is causal (None: detected, as in torch);
        ``memory_is_causal``: hint that memory_mask is causal (default False)."""
        is_batched = src.dim() == 3
        if not self.batch_first and src.size(1) != tgt.size(1) and is_batched:
            raise RuntimeError("the batch number of src and tgt must be equal")
        elif self.batch_first and src.size(0) != tgt.size(0) and is_batched:
            raise RuntimeError("the batch number of src and tgt must be equal")
        if src.size(-1) != self.d_model or tgt.size(-1) != self.d_model:
            raise RuntimeError("the feature number of src and tgt must be equal to d_model")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device: Optional[torch.device] = None,
                                        dtype: Optional[torch.dtype] = None) -> Tensor:
        r"""Generate a square causal mask for the sequence: -inf at masked (future) positions, 0.0 elsewhere."""
        return _generate_square_subsequent_mask(sz, dtype=dtype, device=device)

    def _reset_parameters(self) -> None:
        r"""Initialise parameters as torch does: xavier_uniform_ for every parameter with more than one dim."""
        for p in self.parameters():
            if p.dim() > 1:
                xavier_uniform_(p)
