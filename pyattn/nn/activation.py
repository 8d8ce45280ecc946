"""MultiheadAttention: a subclass of torch.nn.MultiheadAttention (same constructor, parameters, state_dict and
forward signature) whose attention runs on pyattn.scaled_dot_product_attention.

``need_weights=True`` (torch's default) needs the attention matrix, which fused kernels never form: that call is
served by torch's own implementation, exactly as torch.nn.MultiheadAttention would compute it.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import scaled_dot_product_attention


def _as_keep_or_additive(mask: Optional[Tensor], dtype: torch.dtype, name: str = "masks") -> Optional[Tensor]:
    """torch.nn's masks mark positions to IGNORE (bool True) or add a float; SDPA's bool marks positions to KEEP."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask.to(dtype)


def _shape_check(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                 attn_mask: Optional[Tensor], num_heads: int) -> bool:
    """torch's _mha_shape_check (same exception types and texts): is the input batched (3-D) or not (2-D)?"""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError("For batched (3-D) `query`, expected `key` and `value` to be 3-D"
                                 f" but found {key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError("For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D"
                                 f" but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError("For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                                 f" but found {attn_mask.dim()}-D tensor instead")
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError("For unbatched (2-D) `query`, expected `key` and `value` to be 2-D"
                                 f" but found {key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError("For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D"
                                 f" but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError("For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                                     f" but found {attn_mask.dim()}-D tensor instead")
            if attn_mask.dim() == 3:
                expected = (num_heads, query.shape[0], key.shape[0])
                if attn_mask.shape != expected:
                    raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
        return False
    raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")


def _merge(attn_mask: Optional[Tensor], kpm: Optional[Tensor]) -> Optional[Tensor]:
    """Combine (.., L, S) attention and (B, 1, 1, S) key-padding masks, each bool-keep or additive."""
    if attn_mask is None or kpm is None:
        return attn_mask if kpm is None else kpm
    if attn_mask.dtype == torch.bool and kpm.dtype == torch.bool:
        return attn_mask & kpm
    dtype = attn_mask.dtype if attn_mask.dtype != torch.bool else kpm.dtype

    def additive(m: Tensor) -> Tensor:
        return m if m.dtype != torch.bool else torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
            ~m, float("-inf"))
    return additive(attn_mask) + additive(kpm)


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on pyattn's attention kernels (see the module docstring for need_weights)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batched = _shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=2)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        same_kv = key is value
        same_qkv = same_kv and query is key
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # -> (B, L, E) views
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal, same_qkv, same_kv)  # (B, L, E)
        if not batched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _project(self, query: Tensor, key: Tensor, value: Tensor, same_qkv: bool, same_kv: bool):
        """The input projections, packed like torch's: one GEMM for self-attention (query is key is value), two
        when key is value. q, k, v come back as column slices of the packed output (no copies)."""
        e, b = self.embed_dim, self.in_proj_bias
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if same_qkv:
                return F.linear(query, w, b).chunk(3, dim=-1)
            if same_kv:
                k, v = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
                return F.linear(query, w[:e], None if b is None else b[:e]), k, v
            w_q, w_k, w_v = w.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal, same_qkv=False, same_kv=False):
        """query (B, L, E), key/value (B, S, E) -> (B, L, E). Heads are views of the projections, (B, H, L, Dh) with
        (B, L, H, Dh) memory, and so is the attention output: no transposing copies on the way."""
        bsz, tgt_len, embed = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if embed != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed}")
        q, k, v = self._project(query, key, value, same_qkv, same_kv)  # (B, L|S, E)
        src_len = k.shape[1]
        # torch only trusts the is_causal hint when there is no key padding mask to merge
        causal = is_causal and key_padding_mask is None
        kpm = _as_keep_or_additive(key_padding_mask, q.dtype, "key_padding_mask")  # torch checks it first
        if causal:  # the mask is not read, but torch still checks its dtype
            _as_keep_or_additive(attn_mask[:0], q.dtype, "attn_mask")
        am = None if causal else _as_keep_or_additive(attn_mask, q.dtype, "attn_mask")
        # torch's shape checks (same texts): without them a transposed mask of the right numel would be reshaped
        # into place silently
        if am is not None:
            if am.dim() == 2 and am.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {am.shape}, but should be {(tgt_len, src_len)}.")
            if am.dim() == 3 and am.shape != (bsz * heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {am.shape}, but should be "
                                   f"{(bsz * heads, tgt_len, src_len)}.")
        if kpm is not None:
            for d, want in ((0, bsz), (1, src_len)):
                if kpm.shape[d] != want:
                    raise AssertionError(f"Expected key_padded_mask.shape[{d}] to be {want}, but got {kpm.shape[d]}")
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, embed).expand(bsz, 1, embed)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, embed).expand(bsz, 1, embed)], dim=1)
            am = None if am is None else F.pad(am, (0, 1), value=True if am.dtype == torch.bool else 0.0)
            kpm = None if kpm is None else F.pad(kpm, (0, 1), value=True if kpm.dtype == torch.bool else 0.0)
        src_len = k.shape[1]
        q = q.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, H, L, Dh)
        k = k.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, H, S, Dh)
        v = v.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            am = None if am is None else F.pad(am, (0, 1), value=True if am.dtype == torch.bool else 0.0)
            kpm = None if kpm is None else F.pad(kpm, (0, 1), value=True if kpm.dtype == torch.bool else 0.0)
        # explicit last dims: a -1 is ambiguous when the batch or the query length is 0
        if am is not None:
            s_len = am.shape[-1]
            am = am.view(bsz, heads, tgt_len, s_len) if am.dim() == 3 else am.view(1, 1, tgt_len, s_len)
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, kpm.shape[-1])
        mask = _merge(am, kpm)
        dropout = self.dropout if self.training else 0.0
        if dropout >= 1.0:  # torch drops every attention weight (its dropout multiplies by 0): zeros, zero grads
            o = scaled_dot_product_attention(q, k, v, mask, 0.0, causal) * 0.0
        else:
            o = scaled_dot_product_attention(q, k, v, mask, dropout, causal)  # (B, H, L, Dh)
        o = o.transpose(1, 2).reshape(bsz, tgt_len, embed)
        return F.linear(o, self.out_proj.weight, self.out_proj.bias)
