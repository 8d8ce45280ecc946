"""Hugging Face transformers integration: ``attn_implementation="pyattn"``.

    import pyattn.integrations.transformers as pyattn_hf
    pyattn_hf.register()                                    # once per process; idempotent
    model = AutoModel.from_config(cfg, attn_implementation="pyattn")
    model.set_attn_implementation("pyattn")                 # or switch a loaded model

``register()`` adds :func:`pyattn_attention_forward` to transformers' ``AttentionInterface`` and transformers'
own ``sdpa_mask`` to its ``AttentionMaskInterface`` under the same name, so models build the same masks for
"pyattn" as for "sdpa": 4-D boolean ``(B, 1, Lq, Lk)`` masks (True = attend), or ``None`` when a plain causal
mask can be expressed by ``is_causal``. The attention function does what transformers'
``sdpa_attention_forward`` does, through ``pyattn.scaled_dot_product_attention``: GQA/MQA with ``enable_gqa``
(K/V are never repeated), ``is_causal`` only for a mask-free multi-token query, the model's ``scaling`` and
(in training) ``dropout``, T5-style ``position_bias`` merged into an additive mask, and the output transposed
to ``(B, Lq, H, D)`` with ``None`` attention weights.

Importing this module does not import transformers; ``register()`` does, and raises ``ImportError`` when it is
missing. Tested with transformers 5.24 (the ``AttentionInterface`` / ``AttentionMaskInterface`` API,
transformers >= 4.53); on older 4.48+ releases only the attention function is registered and models build
their eager-style additive masks, which pyattn also accepts.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

__all__ = ["NAME", "pyattn_attention_forward", "register", "is_registered"]

NAME = "pyattn"
_lock = threading.Lock()
_registered: dict = {}  # name -> (backend, attention function), what register() installed


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "pyattn.integrations.transformers.register() needs the 'transformers' package (>= 4.48), which "
            "is not installed: pip install 'transformers>=4.48' (or pip install 'pyattn[hf]')"
        ) from e
    return transformers


def _merge_position_bias(position_bias, attention_mask, is_causal, q_len, kv_len, device):
    """T5-style relative position bias (B|1, H, Lq, Lk) and the mask -> one additive mask, as transformers'
    sdpa path builds it: masked positions get the dtype's most negative value (not -inf)."""
    min_value = torch.finfo(position_bias.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()  # top-left causal
        return torch.where(keep.view(1, 1, q_len, kv_len), position_bias, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, min_value)
    return position_bias + attention_mask


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
               position_bias=None, *, backend: Optional[str] = None, **kwargs):
    from ..ops.attention import scaled_dot_product_attention

    if kwargs.get("softcap") is not None:
        raise ValueError(
            "attn_implementation='pyattn' does not support softcap (logit soft-capping); use 'eager' for "
            "this model"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            "attn_implementation='pyattn' does not support s_aux (attention sinks); use 'eager' for this "
            "model"
        )
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attn_implementation='pyattn' expects attention_mask to be a 4-D torch.Tensor or None, got "
            f"{type(attention_mask).__name__} (was the model's mask built for another attn_implementation?)"
        )
    # query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D|Dv)
    q_len = query.shape[2]
    enable_gqa = query.shape[1] != key.shape[1]  # GQA/MQA (num_key_value_groups > 1): K/V not repeated
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # The causal flag only for a multi-token query without a mask (a decoding step sees every cached key).
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:  # prefill into an empty static cache: later keys are masked
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _merge_position_bias(position_bias, attention_mask, is_causal, q_len, key.shape[2],
                                              query.device)
        is_causal = False
    if (attention_mask is not None and attention_mask.is_floating_point()
            and attention_mask.dtype not in (torch.float32, query.dtype)):
        attention_mask = attention_mask.to(query.dtype)  # e.g. a user's fp16 4-D mask with an fp32 model
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=float(dropout), is_causal=is_causal,
        scale=scaling, enable_gqa=enable_gqa, backend=backend,
    )  # (B, Hq, Lq, Dv)
    return out.transpose(1, 2).contiguous(), None  # (B, Lq, Hq, Dv), no attention weights


def pyattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                             dropout: float = 0.0, scaling: Optional[float] = None,
                             is_causal: Optional[bool] = None,
                             position_bias: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention-function signature on pyattn (automatic backend choice): query (B, Hq, Lq,
    D), key and value (B, Hkv, Lk, D) with Hkv dividing Hq, attention_mask None / bool (True = attend) /
    additive, broadcastable to (B, Hq, Lq, Lk) -> (attn_output (B, Lq, Hq, Dv), None)."""
    return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias,
                      **kwargs)


def _make_forward(backend: Optional[str]):
    if backend is None:
        return pyattn_attention_forward

    def pyattn_attention_forward_forced(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                        is_causal=None, position_bias=None, **kwargs):
        return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                          position_bias, backend=backend, **kwargs)

    pyattn_attention_forward_forced.__doc__ = (pyattn_attention_forward.__doc__ or "").replace(
        "automatic backend choice", f"backend {backend!r} forced")
    return pyattn_attention_forward_forced


def register(backend: Optional[str] = None, name: str = NAME) -> str:
    """Register ``name`` (default ``"pyattn"``) as an ``attn_implementation`` in transformers; returns it.

    ``backend`` forces one pyattn backend for every attention call of such models (``None``: pyattn's
    automatic choice). Calling again with the same arguments does nothing; with another ``backend`` it
    replaces the function. Raises ``ImportError`` when transformers is not installed and ``ValueError`` for an
    unknown backend name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register(): name must be a non-empty string, got {name!r}")
    if backend is not None:
        from ..dispatch import get_backend

        get_backend(backend)  # ValueError naming the unknown backend
    transformers = _import_transformers()
    with _lock:
        prev = _registered.get(name)
        if prev is not None and prev[0] == backend and is_registered(name):
            return name
        fn = _make_forward(backend)
        interface = getattr(transformers, "AttentionInterface", None)
        if interface is not None:
            interface.register(name, fn)
        else:  # transformers < 4.50: a plain dict
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            ALL_ATTENTION_FUNCTIONS[name] = fn
        try:
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        except ImportError:  # transformers < 4.53: models build their masks themselves
            pass
        else:
            AttentionMaskInterface.register(name, sdpa_mask)
        _registered[name] = (backend, fn)
    return name


def is_registered(name: str = NAME) -> bool:
    """Whether ``name`` maps to the function register() installed (False when transformers is not installed
    or not imported yet)."""
    import sys

    if "transformers" not in sys.modules or name not in _registered:
        return False
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    try:
        return ALL_ATTENTION_FUNCTIONS[name] is _registered[name][1]
    except KeyError:
        return False
