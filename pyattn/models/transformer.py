"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017) on pyattn's modules.

    src ids (B, S) -> embedding * sqrt(d_model) + PE -> dropout -> pyattn.nn.TransformerEncoder -> memory (B, S, E)
    tgt ids (B, T) -> embedding * sqrt(d_model) + PE -> dropout -> pyattn.nn.TransformerDecoder (causal self-attention,
        cross-attention over memory) -> linear over the target vocabulary -> logits (B, T, V) (softmax in the loss,
        log_softmax in ``generate``)

The encoder and decoder are those of a ``pyattn.nn.Transformer`` (``model.transformer``, batch_first, with torch.nn's
state_dict keys, so ``model.transformer`` loads into / from a ``torch.nn.Transformer``; like torch's, it has a final
LayerNorm after each stack, ``encoder.norm`` / ``decoder.norm``). Positional encoding is the paper's sinusoid,
PE(pos, 2i) = sin(pos / 10000^(2i / d_model)), PE(pos, 2i + 1) = cos(pos / 10000^(2i / d_model)), kept as a
(non-persistent) buffer.

``generate`` runs greedy or beam search with incremental decoding: the encoder runs once; each step feeds only the
newest token through the decoder, whose layers are evaluated by ``decoder_layer_step`` (the same parameters as the
``pyattn.nn.TransformerDecoderLayer`` modules, read from them): the self-attention K/V of the new position are
written into a per-layer cache and attention runs with one query row against the cached keys; the cross-attention
K/V of the memory are projected once per layer and reused at every step. Beam search reorders the self-attention
caches by beam index. ``generate(..., use_cache=False)`` recomputes the whole decoder over the prefix at every step
instead (the reference the cache is tested against).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import scaled_dot_product_attention
from ..nn import Transformer
from ..nn.transformer import TransformerDecoderLayer, _add_norm

__all__ = ["TransformerConfig", "EncoderDecoderTransformer", "sinusoidal_positional_encoding", "KVCache",
           "LayerKVCache", "decoder_layer_step"]


# ---- configuration ---------------------------------------------------------------------------------------------

@dataclass
class TransformerConfig:
    """Sizes and options of :class:`EncoderDecoderTransformer`.

    ``tie_embeddings``: the target embedding and the output projection share one weight matrix (the paper's
    weight sharing). ``share_src_tgt_embeddings``: the source embedding is that same matrix too (needs
    ``src_vocab_size == tgt_vocab_size``: a shared vocabulary, as the paper's 37k BPE vocabulary for En-De).
    ``max_len``: the longest source or target sequence (rows of the positional-encoding table).
    ``pad_id``/``bos_id``/``eos_id``: special ids, the same in both vocabularies; ``bos_id`` starts every decoder
    input, ``pad_id`` marks source padding (and is never generated).
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    max_len: int = 1024
    norm_first: bool = False
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    share_src_tgt_embeddings: bool = False
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "nhead", "dim_feedforward", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {v!r}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TransformerConfig.{name} must be an int >= 0, got {v!r}")
        if self.num_decoder_layers < 1:
            raise ValueError("TransformerConfig.num_decoder_layers must be >= 1 (the decoder produces the logits)")
        if self.d_model % self.nhead:
            raise ValueError(f"TransformerConfig.d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"TransformerConfig.activation must be 'relu' or 'gelu', got {self.activation!r}")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        if len(set(ids.values())) != 3:
            raise ValueError(f"TransformerConfig pad_id, bos_id and eos_id must be distinct, got {ids}")
        for name, v in ids.items():
            if not 0 <= v < min(self.src_vocab_size, self.tgt_vocab_size):
                raise ValueError(f"TransformerConfig.{name}={v} is outside both vocabularies "
                                 f"[0, {min(self.src_vocab_size, self.tgt_vocab_size)})")
        if self.share_src_tgt_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("TransformerConfig.share_src_tgt_embeddings needs src_vocab_size == tgt_vocab_size "
                             f"(a shared vocabulary), got {self.src_vocab_size} and {self.tgt_vocab_size}")
        if self.share_src_tgt_embeddings and not self.tie_embeddings:
            raise ValueError("TransformerConfig.share_src_tgt_embeddings=True also needs tie_embeddings=True "
                             "(source, target and output share one matrix)")

    @classmethod
    def base(cls, src_vocab_size: int = 37000, tgt_vocab_size: Optional[int] = None,
             **overrides) -> "TransformerConfig":
        """The paper's base model: N = 6 encoder and decoder layers, d_model = 512, h = 8 heads, d_ff = 2048,
        dropout 0.1, post-norm, shared embeddings and output projection (source too when the vocabularies are the
        same, e.g. the paper's 37000-token shared BPE vocabulary: about 63M parameters)."""
        tgt = src_vocab_size if tgt_vocab_size is None else tgt_vocab_size
        kw = dict(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                  dropout=0.1, norm_first=False, activation="relu", tie_embeddings=True,
                  share_src_tgt_embeddings=src_vocab_size == tgt)
        kw.update(overrides)
        return cls(src_vocab_size, tgt, **kw)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- positional encoding -----------------------------------------------------------------------------------------

def sinusoidal_positional_encoding(max_len: int, d_model: int, dtype: torch.dtype = torch.float32,
                                   device=None) -> Tensor:
    """(max_len, d_model): PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)),
    computed in float64 and rounded once to ``dtype``."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]                                 # (L, 1)
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (ceil(d/2),)
    angles = pos * inv_freq                                                                  # (L, ceil(d/2))
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return pe.to(dtype=dtype, device=device)


# ---- the key/value cache and the one-step decoder layer ---------------------------------------------------------

@dataclass
class LayerKVCache:
    """One decoder layer's cache for N sequences: self-attention K/V of the positions decoded so far (preallocated
    for ``capacity`` positions) and the cross-attention K/V of the memory (computed once)."""

    self_k: Tensor   # (N, H, capacity, Dh)
    self_v: Tensor   # (N, H, capacity, Dh)
    cross_k: Tensor  # (N, H, S, Dh)
    cross_v: Tensor  # (N, H, S, Dh)


@dataclass
class KVCache:
    """The decoder's cache: one :class:`LayerKVCache` per layer, the number of cached positions, and the memory's
    attention mask ((N, 1, 1, S) bool, True = attend; None without source padding)."""

    layers: list
    memory_mask: Optional[Tensor]
    length: int = 0
    capacity: int = 0

    def reorder(self, index: Tensor) -> None:
        """Beam search: sequence i continues sequence ``index[i]``. Reorders the self-attention K/V of the cached
        positions. The cross-attention K/V and the memory mask are left as they are: beam search only moves a
        hypothesis between the beams of the same source, whose memory rows are equal."""
        n = self.length
        for lc in self.layers:
            lc.self_k[:, :, :n] = lc.self_k[index, :, :n]
            lc.self_v[:, :, :n] = lc.self_v[index, :, :n]


def _check_layer_for_step(layer: nn.Module) -> None:
    if not isinstance(layer, TransformerDecoderLayer) and not isinstance(layer, nn.TransformerDecoderLayer):
        raise TypeError(f"decoder_layer_step needs a (pyattn.nn or torch.nn) TransformerDecoderLayer, got "
                        f"{type(layer).__name__}")
    if layer.training:
        raise RuntimeError("decoder_layer_step is an inference step (no dropout): call .eval() on the model first")
    for name in ("self_attn", "multihead_attn"):
        mha = getattr(layer, name)
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError(f"decoder_layer_step: {name} uses kdim/vdim, add_bias_kv or add_zero_attn, "
                                      "which the cached step does not implement")


def _heads(x: Tensor, heads: int) -> Tensor:
    """(N, L, E) -> (N, H, L, Dh) view."""
    n, length, e = x.shape
    return x.view(n, length, heads, e // heads).transpose(1, 2)


def project_memory(layer: nn.Module, memory: Tensor) -> tuple[Tensor, Tensor]:
    """The cross-attention K and V of ``memory`` (N, S, E) for one decoder layer, with that layer's
    ``multihead_attn`` weights: two (N, H, S, Dh) tensors."""
    mha = layer.multihead_attn
    e = mha.embed_dim
    w_k, w_v = mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:]
    b_k = b_v = None
    if mha.in_proj_bias is not None:
        b_k, b_v = mha.in_proj_bias[e:2 * e], mha.in_proj_bias[2 * e:]
    k = _heads(F.linear(memory, w_k, b_k), mha.num_heads).contiguous()
    v = _heads(F.linear(memory, w_v, b_v), mha.num_heads).contiguous()
    return k, v


def _self_attention_step(mha: nn.MultiheadAttention, x: Tensor, cache: LayerKVCache, pos: int) -> Tensor:
    """x (N, 1, E) at position ``pos``: append its K/V to the cache, attend with one query row over positions
    0..pos (all of them: causality needs no mask when the query is the newest position)."""
    h = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)  # 3 x (N, 1, E)
    cache.self_k[:, :, pos:pos + 1] = _heads(k, h)
    cache.self_v[:, :, pos:pos + 1] = _heads(v, h)
    o = scaled_dot_product_attention(_heads(q, h), cache.self_k[:, :, :pos + 1], cache.self_v[:, :, :pos + 1])
    o = o.transpose(1, 2).reshape(x.shape)                                            # (N, H, 1, Dh) -> (N, 1, E)
    return mha.out_proj(o)


def _cross_attention_step(mha: nn.MultiheadAttention, x: Tensor, cache: LayerKVCache,
                          memory_mask: Optional[Tensor]) -> Tensor:
    """x (N, 1, E) attends over the cached memory K/V (N, H, S, Dh); memory_mask (N, 1, 1, S) bool keep or None."""
    e = mha.embed_dim
    b_q = None if mha.in_proj_bias is None else mha.in_proj_bias[:e]
    q = _heads(F.linear(x, mha.in_proj_weight[:e], b_q), mha.num_heads)               # (N, H, 1, Dh)
    o = scaled_dot_product_attention(q, cache.cross_k, cache.cross_v, memory_mask)
    return mha.out_proj(o.transpose(1, 2).reshape(x.shape))


def decoder_layer_step(layer: nn.Module, x: Tensor, cache: LayerKVCache, pos: int,
                       memory_mask: Optional[Tensor] = None) -> Tensor:
    """One decoding step of one ``TransformerDecoderLayer`` (eval mode), with that layer's own parameters.

    x: (N, 1, E), the layer's input at position ``pos`` (the newest target position); cache: the layer's
    :class:`LayerKVCache` holding positions 0..pos-1 (position ``pos`` is written here); memory_mask: (N, 1, 1, S)
    bool (True = attend) or None. Returns the layer's output at position ``pos``, (N, 1, E): equal (up to float
    rounding) to ``layer(tgt, memory, causal mask)[:, pos]`` over the whole prefix, for post-norm and pre-norm
    (``layer.norm_first``) layers, with the layer's activation. Add & Norm runs fused as in the layer.
    """
    _check_layer_for_step(layer)
    if layer.norm_first:
        a = _self_attention_step(layer.self_attn, layer.norm1(x), cache, pos)
        h, x = _add_norm(layer.norm2, x, a, return_residual=True)       # h = norm2(x + a), x = x + a
        a = _cross_attention_step(layer.multihead_attn, h, cache, memory_mask)
        h, x = _add_norm(layer.norm3, x, a, return_residual=True)
        return x + layer.linear2(layer.activation(layer.linear1(h)))
    x = _add_norm(layer.norm1, x, _self_attention_step(layer.self_attn, x, cache, pos))
    x = _add_norm(layer.norm2, x, _cross_attention_step(layer.multihead_attn, x, cache, memory_mask))
    return _add_norm(layer.norm3, x, layer.linear2(layer.activation(layer.linear1(x))))


# ---- the model ---------------------------------------------------------------------------------------------------

def _check_ids(t, name: str, vocab: int, max_len: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (torch.int64 or torch.int32), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, length), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has length 0 (shape {tuple(t.shape)})")
    if t.shape[1] > max_len:
        raise ValueError(f"{name} has length {t.shape[1]} > config.max_len={max_len} (rows of the positional "
                         "encoding)")
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} holds token id {lo if lo < 0 else hi} outside its vocabulary [0, {vocab})")


def _check_kpm(mask: Optional[Tensor], name: str, ids: Tensor, ids_name: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = padding), got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if mask.shape != ids.shape:
        raise ValueError(f"{name} must have the shape of {ids_name} {tuple(ids.shape)}, got {tuple(mask.shape)}")


class EncoderDecoderTransformer(nn.Module):
    """The paper's encoder-decoder Transformer (see the module docstring), built from ``pyattn.nn.Transformer``.

    Submodules: ``src_embed`` / ``tgt_embed`` (``nn.Embedding``; the same module when
    ``config.share_src_tgt_embeddings``), ``pos_encoding`` buffer ``pe`` (max_len, d_model), ``dropout``,
    ``transformer`` (``pyattn.nn.Transformer``, batch_first; ``.encoder`` / ``.decoder`` are the drop-in stacks),
    ``generator`` (``nn.Linear(d_model, tgt_vocab_size, bias=False)``, its weight *is* ``tgt_embed.weight`` when
    ``config.tie_embeddings``). Embeddings are initialised N(0, d_model^-0.5) (so that, scaled by sqrt(d_model),
    they have unit variance), the Transformer's matrices with xavier_uniform_ as torch.nn.Transformer does.
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = c = config
        fk = {"device": device, "dtype": dtype}
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model, **fk)
        self.src_embed = self.tgt_embed if c.share_src_tgt_embeddings else nn.Embedding(c.src_vocab_size, c.d_model,
                                                                                      **fk)
        self.register_buffer("pe", sinusoidal_positional_encoding(c.max_len, c.d_model, dtype or torch.float32,
                                                                  device), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers,
                                       c.dim_feedforward, c.dropout, c.activation, layer_norm_eps=c.layer_norm_eps,
                                       batch_first=True, norm_first=c.norm_first, **fk)
        self.generator = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False, **fk)
        std = c.d_model ** -0.5
        with torch.no_grad():
            nn.init.normal_(self.tgt_embed.weight, 0.0, std)
            if self.src_embed is not self.tgt_embed:
                nn.init.normal_(self.src_embed.weight, 0.0, std)
            if c.tie_embeddings:
                self.generator.weight = self.tgt_embed.weight
            else:
                nn.init.normal_(self.generator.weight, 0.0, std)
        self.embed_scale = math.sqrt(c.d_model)

    @property
    def encoder(self):
        return self.transformer.encoder

    @property
    def decoder(self):
        return self.transformer.decoder

    # -- pieces ---------------------------------------------------------------------------------------------------

    def _embed(self, embedding: nn.Embedding, ids: Tensor, start: int = 0) -> Tensor:
        x = embedding(ids) * self.embed_scale + self.pe[start:start + ids.shape[1]]     # (B, L, E)
        return self.dropout(x)

    def source_padding_mask(self, src: Tensor) -> Optional[Tensor]:
        """(B, S) bool, True at ``pad_id``; None when ``src`` holds no padding (attention then needs no mask)."""
        mask = src.eq(self.config.pad_id)
        return mask if bool(mask.any()) else None

    def encode(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """src (B, S) ids -> (memory (B, S, E), the key padding mask used: the given one, else derived from
        ``pad_id``)."""
        c = self.config
        _check_ids(src, "src", c.src_vocab_size, c.max_len)
        _check_kpm(src_key_padding_mask, "src_key_padding_mask", src, "src")
        if src_key_padding_mask is None:
            src_key_padding_mask = self.source_padding_mask(src)
        memory = self.transformer.encoder(self._embed(self.src_embed, src), src_key_padding_mask=src_key_padding_mask)
        return memory, src_key_padding_mask

    def decode(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
               tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """tgt (B, T) ids (starting with ``bos_id``) against memory (B, S, E) -> decoder output (B, T, E), causal."""
        c = self.config
        _check_ids(tgt, "tgt", c.tgt_vocab_size, c.max_len)
        _check_kpm(tgt_key_padding_mask, "tgt_key_padding_mask", tgt, "tgt")
        t = tgt.shape[1]
        causal = Transformer.generate_square_subsequent_mask(t, device=tgt.device, dtype=memory.dtype)
        return self.transformer.decoder(self._embed(self.tgt_embed, tgt), memory, tgt_mask=causal,
                                        tgt_key_padding_mask=tgt_key_padding_mask,
                                        memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=True)

    def forward(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src (B, S), tgt (B, T) token ids -> logits (B, T, tgt_vocab_size); position t of tgt sees tgt[:, :t+1]
        (causal) and all of src.

        ``src_key_padding_mask`` (B, S) bool, True = padding: None derives it from ``config.pad_id``.
        ``tgt_key_padding_mask`` (B, T) bool: None = no mask. Right-padded targets need none: under the causal mask
        a position never sees the padding after it (and the loss should ignore ``pad_id`` targets).
        """
        if isinstance(tgt, Tensor) and isinstance(src, Tensor) and tgt.dim() == 2 and src.dim() == 2 \
                and src.shape[0] != tgt.shape[0]:
            raise ValueError(f"src and tgt must have the same batch size, got {src.shape[0]} and {tgt.shape[0]}")
        memory, mkpm = self.encode(src, src_key_padding_mask)
        return self.generator(self.decode(tgt, memory, mkpm, tgt_key_padding_mask))

    def log_probs(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                  tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``log_softmax(forward(...))`` in float32: the final softmax of the paper, in log space."""
        return F.log_softmax(self(src, tgt, src_key_padding_mask, tgt_key_padding_mask).float(), dim=-1)

    # -- incremental decoding -------------------------------------------------------------------------------------

    def init_cache(self, memory: Tensor, memory_key_padding_mask: Optional[Tensor], capacity: int) -> KVCache:
        """A :class:`KVCache` for ``memory`` (N, S, E): the cross-attention K/V of every decoder layer, projected
        once, and empty self-attention K/V buffers for ``capacity`` positions."""
        n = memory.shape[0]
        layers = []
        for layer in self.transformer.decoder.layers:
            sa = layer.self_attn
            k, v = project_memory(layer, memory)
            shape = (n, sa.num_heads, capacity, sa.embed_dim // sa.num_heads)
            layers.append(LayerKVCache(memory.new_empty(shape), memory.new_empty(shape), k, v))
        mask = None if memory_key_padding_mask is None else ~memory_key_padding_mask[:, None, None, :]
        return KVCache(layers, mask, 0, capacity)

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Feed the newest target token of each sequence, tokens (N,), at position ``cache.length``; returns the
        logits of the next token (N, V) and advances the cache by one position."""
        pos = cache.length
        if pos >= cache.capacity:
            raise RuntimeError(f"KVCache is full ({cache.capacity} positions)")
        x = self._embed(self.tgt_embed, tokens[:, None], start=pos)                      # (N, 1, E)
        for layer, lc in zip(self.transformer.decoder.layers, cache.layers):
            x = decoder_layer_step(layer, x, lc, pos, cache.memory_mask)
        if self.transformer.decoder.norm is not None:
            x = self.transformer.decoder.norm(x)
        cache.length = pos + 1
        return self.generator(x[:, 0])

    @torch.no_grad()
    def generate(self, src: Tensor, max_new_tokens: int, num_beams: int = 1, *, length_penalty: float = 1.0,
                 early_stopping: bool = False, min_new_tokens: int = 0,
                 src_key_padding_mask: Optional[Tensor] = None, use_cache: bool = True, return_scores: bool = False):
        """Translate ``src`` (B, S) ids: greedy search (``num_beams=1``) or beam search, in eval mode (dropout off;
        the module's train/eval mode is restored afterwards).

        Returns (B, T) generated ids (no ``bos_id``), T <= max_new_tokens: each row stops at its ``eos_id``
        (included) and is padded with ``pad_id`` after it; a row that never produced ``eos_id`` has
        ``max_new_tokens`` tokens. ``pad_id`` and ``bos_id`` are never generated. With ``return_scores`` also the
        (B,) float32 scores: the sum of the tokens' log-probabilities, divided by ``length ** length_penalty`` for
        beam search (length = generated tokens, eos included).

        Beam search keeps ``num_beams`` live hypotheses per source; a hypothesis ending in ``eos_id`` (among the
        ``num_beams`` best candidates of a step) is set aside; a source is done when ``num_beams`` hypotheses are
        set aside and (``early_stopping=False``) its best live hypothesis, length-normalised at the current
        length, cannot beat the worst of them, or (``early_stopping=True``) at once. Live hypotheses at
        ``max_new_tokens`` compete with the finished ones. ``length_penalty`` > 0 favours longer outputs, < 0
        shorter ones. ``min_new_tokens``: ``eos_id`` is not generated before that many tokens (benchmarks use it to
        decode a fixed number of tokens).

        ``use_cache=False`` runs the whole decoder over the prefix at every step (no cache; O(T^2) per sequence)
        instead of :meth:`decode_step`: same search, same results up to float rounding.
        """
        c = self.config
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if max_new_tokens > c.max_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} > config.max_len={c.max_len} (decoder positions)")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) \
                or not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens={max_new_tokens}], "
                             f"got {min_new_tokens!r}")
        if not math.isfinite(float(length_penalty)):
            raise ValueError(f"length_penalty must be finite, got {length_penalty!r}")
        was_training = self.training
        self.eval()
        try:
            memory, mkpm = self.encode(src, src_key_padding_mask)
            if src.shape[0] == 0:
                out = src.new_empty((0, 0), dtype=torch.long)
                return (out, memory.new_empty(0, dtype=torch.float32)) if return_scores else out
            if num_beams > 1:
                memory = memory.repeat_interleave(num_beams, dim=0)                      # (B*K, S, E)
                mkpm = None if mkpm is None else mkpm.repeat_interleave(num_beams, dim=0)
            stepper = (_CachedStepper(self, memory, mkpm, max_new_tokens) if use_cache
                       else _FullStepper(self, memory, mkpm))
            if num_beams == 1:
                tokens, scores = _greedy(stepper, src.shape[0], max_new_tokens, min_new_tokens, c, memory.device)
            else:
                tokens, scores = _beam_search(stepper, src.shape[0], num_beams, max_new_tokens, min_new_tokens, c,
                                              memory.device, float(length_penalty), early_stopping)
        finally:
            self.train(was_training)
        return (tokens, scores) if return_scores else tokens


# ---- search ------------------------------------------------------------------------------------------------------

class _CachedStepper:
    """Next-token log-probs from the newest token only, with a KVCache (reordered by beam search)."""

    def __init__(self, model: EncoderDecoderTransformer, memory: Tensor, mkpm: Optional[Tensor], steps: int):
        self.model = model
        self.cache = model.init_cache(memory, mkpm, steps)

    def __call__(self, tokens: Tensor) -> Tensor:  # tokens (N, t) -> (N, V) log-probs of token t+1
        if tokens.shape[1] != self.cache.length + 1:
            raise RuntimeError("cached decoding fed out of order")
        return F.log_softmax(self.model.decode_step(tokens[:, -1], self.cache).float(), dim=-1)

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)


class _FullStepper:
    """Next-token log-probs by running the whole decoder over the prefix (the reference for the cache)."""

    def __init__(self, model: EncoderDecoderTransformer, memory: Tensor, mkpm: Optional[Tensor]):
        self.model, self.memory, self.mkpm = model, memory, mkpm

    def __call__(self, tokens: Tensor) -> Tensor:
        h = self.model.decode(tokens, self.memory, self.mkpm)                        # (N, t, E)
        return F.log_softmax(self.model.generator(h[:, -1]).float(), dim=-1)

    def reorder(self, index: Tensor) -> None:
        pass  # the prefix tokens are reordered by the search itself


def _forbid_specials(logp: Tensor, c: TransformerConfig, eos_too: bool = False) -> Tensor:
    logp[:, c.pad_id] = float("-inf")
    logp[:, c.bos_id] = float("-inf")
    if eos_too:
        logp[:, c.eos_id] = float("-inf")
    return logp


def _greedy(stepper, batch: int, steps: int, min_steps: int, c: TransformerConfig, device) -> tuple[Tensor, Tensor]:
    tokens = torch.full((batch, 1), c.bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    scores = torch.zeros(batch, dtype=torch.float32, device=device)
    for step in range(steps):
        logp = _forbid_specials(stepper(tokens), c, step < min_steps)                 # (B, V)
        nxt = logp.argmax(dim=-1)
        scores += torch.where(finished, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        nxt = nxt.masked_fill(finished, c.pad_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= nxt.eq(c.eos_id)
        if bool(finished.all()):
            break
    return tokens[:, 1:], scores


def _beam_search(stepper, batch: int, k: int, steps: int, min_steps: int, c: TransformerConfig, device, lp: float,
                 early_stopping: bool) -> tuple[Tensor, Tensor]:
    n = batch * k
    tokens = torch.full((n, 1), c.bos_id, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch, k, dtype=torch.float32, device=device)
    beam_scores[:, 1:] = float("-inf")       # all beams start equal: only the first one expands at step 1
    finished: list[list[tuple[float, float, list]]] = [[] for _ in range(batch)]  # (normalised, raw, ids)
    done = [False] * batch
    for step in range(steps):
        length = step + 1                    # generated tokens once this step's token is appended
        logp = _forbid_specials(stepper(tokens), c, step < min_steps)                 # (N, V)
        v = logp.shape[-1]
        cand = (beam_scores.view(n, 1) + logp).view(batch, k * v)
        top_s, top_i = cand.topk(min(2 * k, k * v), dim=1)                            # (B, 2K), best first
        top_s, top_beam, top_tok = top_s.tolist(), (top_i // v).tolist(), (top_i % v).tolist()
        src_rows, new_tok, new_scores = [], [], []
        prefix = tokens[:, 1:].tolist()
        for b in range(batch):
            chosen = []
            if not done[b]:
                for rank, (s, j, t) in enumerate(zip(top_s[b], top_beam[b], top_tok[b])):
                    if s == float("-inf"):
                        break
                    if t == c.eos_id:
                        if rank < k:
                            _add_hypothesis(finished[b], k, s, prefix[b * k + j] + [t], length, lp)
                        continue
                    chosen.append((b * k + j, t, s))
                    if len(chosen) == k:
                        break
            best_live = chosen[0][2] if chosen else float("-inf")
            if not done[b]:
                done[b] = _is_done(finished[b], k, best_live, length, lp, early_stopping)
            chosen += [(b * k, c.pad_id, float("-inf"))] * (k - len(chosen))         # dead beams
            for row, t, s in chosen:
                src_rows.append(row)
                new_tok.append(t)
                new_scores.append(s)
        if all(done):
            break
        index = torch.tensor(src_rows, dtype=torch.long, device=device)
        tokens = torch.cat([tokens.index_select(0, index),
                            torch.tensor(new_tok, dtype=torch.long, device=device)[:, None]], dim=1)
        beam_scores = torch.tensor(new_scores, dtype=torch.float32, device=device).view(batch, k)
        stepper.reorder(index)
    else:
        # max_new_tokens reached: the live hypotheses compete with the finished ones
        prefix = tokens[:, 1:].tolist()
        live = beam_scores.tolist()
        for b in range(batch):
            if done[b]:
                continue
            for j in range(k):
                if live[b][j] != float("-inf"):
                    _add_hypothesis(finished[b], k, live[b][j], prefix[b * k + j], steps, lp)
    best = [max(h, key=lambda e: e[0]) for h in finished]
    width = max(len(ids) for _, _, ids in best)
    out = torch.full((batch, width), c.pad_id, dtype=torch.long)
    for b, (_, _, ids) in enumerate(best):
        out[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out.to(device), torch.tensor([s for s, _, _ in best], dtype=torch.float32, device=device)


def _add_hypothesis(hyps: list, k: int, raw: float, ids: list, length: int, lp: float) -> None:
    """Keep the ``k`` best finished hypotheses by length-normalised score."""
    hyps.append((raw / length ** lp, raw, ids))
    if len(hyps) > k:
        hyps.sort(key=lambda e: e[0], reverse=True)
        del hyps[k:]


def _is_done(hyps: list, k: int, best_live: float, length: int, lp: float, early_stopping: bool) -> bool:
    if best_live == float("-inf"):
        return bool(hyps)    # no live hypothesis left
    if len(hyps) < k:
        return False
    if early_stopping:
        return True
    return best_live / length ** lp <= min(e[0] for e in hyps)
