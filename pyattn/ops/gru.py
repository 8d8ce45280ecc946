"""GRU cell and one-direction GRU layer: inputs, validation, custom ops, autograd.

torch's formula and gate order r | z | n:
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

Public entry point: ``gru_cell`` (re-exported by pyattn.functional). ``gru_layer`` runs one direction of one
layer over a time-major sequence; pyattn.nn.GRU stacks it over layers and directions.

Op contract shared by every backend:
* x, h, weights reach a backend with ``stride(-1) == 1`` (copied only when not so); other strides as given.
* The forward's saved workspace ``ws`` is [r | z | n | hn] (hn = W_hn h + b_hn), last dim 4H, float32 (float64
  for float64 inputs), so any backend's backward can read any backend's forward; it is an empty tensor when no
  grad is needed. The layer ops' workspace is (T, B, 4H) indexed by time step; backward takes the step's
  previous state from ``out`` (or h0), so the state is rounded to the input dtype between steps.
* Backward returns empty tensors for the weight/bias grads it was not asked for (custom ops cannot return
  None).
* Empty inputs (batch 0, hidden 0, input size 0, T 0) are computed by the torch backend, never by a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..dispatch import OpInputs, backend_request, select
from ._common import Op, check_same_device, dtype_name

_SCALAR_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


def ws_dtype(dtype: torch.dtype) -> torch.dtype:
    """The workspace dtype: float32, except float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sname(dtype: torch.dtype) -> str:
    return _SCALAR_NAMES.get(dtype, dtype_name(dtype))


@dataclass
class GRUCellInputs(OpInputs):
    x: Tensor  # (B, I)
    hx: Tensor  # (B, H)
    w_ih: Tensor  # (3H, I)
    w_hh: Tensor  # (3H, H)
    b_ih: Optional[Tensor]  # (3H,)
    b_hh: Optional[Tensor]  # (3H,)
    needs_grad: bool = False

    op: ClassVar[str] = "gru_cell"

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def input_size(self) -> int:
        return self.x.shape[-1]

    @property
    def hidden_size(self) -> int:
        return self.w_hh.shape[1]

    @property
    def batch(self) -> int:
        return self.x.shape[-2]

    def nothing_to_compute(self) -> bool:
        return self.x.numel() == 0 or self.hx.numel() == 0  # no step, row, input or hidden unit

    def signature(self) -> tuple:
        x = self.x  # runs on every call (every cell step): plain attribute reads where the properties would repeat them
        return (x.device.type, x.dtype, x.shape[-1], self.w_hh.shape[1], self.b_ih is not None, self.b_hh is not None,
                self.needs_grad)

    def describe(self) -> dict:
        return {
            "input": tuple(self.x.shape),
            "hidden": tuple(self.hx.shape),
            "dtype": dtype_name(self.dtype),
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "bias": (self.b_ih is not None, self.b_hh is not None),
            "needs_grad": self.needs_grad,
        }


@dataclass
class GRULayerInputs(GRUCellInputs):
    """x (T, B, I) time-major, hx = h0 (B, H), one direction of one layer."""

    reverse: bool = False

    op: ClassVar[str] = "gru"

    @property
    def seq_len(self) -> int:
        return self.x.shape[0]

    def signature(self) -> tuple:
        return super().signature() + (self.reverse,)

    def describe(self) -> dict:
        return {**super().describe(), "seq_len": self.seq_len, "reverse": self.reverse}


# ---- validation --------------------------------------------------------------------------------------------


def _validate(
    x: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    what: str,
) -> None:
    """x (..., B, I) and hx (B, H) after the unbatched/None handling; torch.nn.GRUCell's texts where it has
    one."""
    if _plainly_valid(x, hx, w_ih, w_hh, b_ih, b_hh):
        return
    for name, t in (("input", x), ("hx", hx), ("weight_ih", w_ih), ("weight_hh", w_hh)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{what}: {name} must be a Tensor or None, got {type(t).__name__}")
    if not x.is_floating_point():
        raise RuntimeError(f"{what}: expected a floating point input, got {dtype_name(x.dtype)}")
    check_same_device(input=x, hx=hx, weight_ih=w_ih, weight_hh=w_hh, bias_ih=b_ih, bias_hh=b_hh)
    if w_ih.dim() != 2 or w_hh.dim() != 2:
        raise RuntimeError(
            f"{what}: expected 2-D weight_ih (3 * hidden_size, input_size) and weight_hh "
            f"(3 * hidden_size, hidden_size), got {list(w_ih.shape)} and {list(w_hh.shape)}"
        )
    hsz = w_hh.shape[1]
    if w_hh.shape[0] != 3 * hsz:
        raise RuntimeError(
            f"weight_hh first dim must be 3 * hidden_size = {3 * hsz}, but got {w_hh.shape[0]}"
        )
    if w_ih.shape[0] != 3 * hsz:
        raise RuntimeError(
            f"weight_ih first dim must be 3 * hidden_size = {3 * hsz}, but got {w_ih.shape[0]}"
        )
    if x.shape[-1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {x.shape[-1]} expected {w_ih.shape[1]}")
    if hx.shape[0] != x.shape[-2]:
        raise RuntimeError(f"Input batch size {x.shape[-2]} doesn't match hidden0 batch size {hx.shape[0]}")
    if hx.shape[1] != hsz:
        raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {hx.shape[1]}, expected {hsz}")
    if x.dtype != w_ih.dtype:
        raise RuntimeError(
            f"mat1 and mat2 must have the same dtype, but got {_sname(x.dtype)} and {_sname(w_ih.dtype)}"
        )
    if hx.dtype != w_hh.dtype:
        raise RuntimeError(
            f"mat1 and mat2 must have the same dtype, but got {_sname(hx.dtype)} and {_sname(w_hh.dtype)}"
        )
    if w_hh.dtype != x.dtype:
        raise RuntimeError(
            f"mat1 and mat2 must have the same dtype, but got {_sname(x.dtype)} and {_sname(w_hh.dtype)}"
        )
    for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if b is None:
            continue
        if tuple(b.shape) != (3 * hsz,):
            raise RuntimeError(
                f"Expected {name} of shape [{3 * hsz}] (3 * hidden_size), but got {list(b.shape)}"
            )
        if b.dtype != x.dtype:
            raise RuntimeError(
                f"Expected {name} to have the input's dtype {dtype_name(x.dtype)}, but got "
                f"{dtype_name(b.dtype)}"
            )


def _plainly_valid(x, hx, w_ih, w_hh, b_ih, b_hh) -> bool:
    """The common valid call in two thirds of _validate's time (it runs on every cell step: 3.2 vs 4.7 us at B = 1):
    tensors of x's floating dtype and device, 2-D weights and hx, shapes that fit, 1-D biases of 3H or None. False
    only means "not this case": _validate's itemised checks then accept or raise."""
    T = Tensor
    if not (isinstance(x, T) and isinstance(hx, T) and isinstance(w_ih, T) and isinstance(w_hh, T)
            and (b_ih is None or isinstance(b_ih, T)) and (b_hh is None or isinstance(b_hh, T))
            and hx.dim() == 2 and w_ih.dim() == 2 and w_hh.dim() == 2):
        return False
    dt, dev = x.dtype, x.device
    (g3, isz), (g3h, hsz), (b, h2) = w_ih.shape, w_hh.shape, hx.shape
    if not (dt.is_floating_point and g3 == g3h == 3 * hsz and h2 == hsz and x.dim() >= 2 and x.shape[-1] == isz
            and x.shape[-2] == b):
        return False
    for t in (hx, w_ih, w_hh, b_ih, b_hh):
        if t is not None and (t.dtype != dt or t.device != dev):
            return False
    return all(t is None or (t.dim() == 1 and t.shape[0] == g3) for t in (b_ih, b_hh))


def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or t.is_contiguous():  # the common case first: contiguous implies one of the conditions below
        return t
    return t if (t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1) else t.contiguous()


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# ---- ops (custom op + eager path, _common.Op): cell ---------------------------------------------------------


def _gru_cell_fwd_impl(
    x: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    needs_grad: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    """x (B, I), hx (B, H) -> h_new (B, H), ws (B, 4H) fp32 (fp64 for fp64) or empty when not needs_grad."""
    inputs = GRUCellInputs(x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad)
    be = select(inputs, backend)
    return be.gru_cell_fwd(x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad)


def _gru_cell_fwd_fake(x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad, backend):
    b, h = hx.shape
    ws = x.new_empty((b, 4 * h) if needs_grad else (0,), dtype=ws_dtype(x.dtype))
    return x.new_empty((b, h)), ws


def _gru_cell_bwd_impl(
    dh: Tensor,
    x: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    ws: Tensor,
    has_b_ih: bool,
    has_b_hh: bool,
    need_weights: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx (B, I), dhx (B, H), dw_ih (3H, I), dw_hh (3H, H), db_ih (3H), db_hh (3H) (empty when not asked
    for)."""
    inputs = GRUCellInputs(x, hx, w_ih, w_hh, None, None, True)
    be = select(inputs, backend)
    return be.gru_cell_bwd(dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights)


def _weight_grad_fakes(w_ih, w_hh, has_b_ih, has_b_hh, need_weights):
    if not need_weights:
        return tuple(w_ih.new_empty(0) for _ in range(4))
    g3 = w_hh.shape[0]
    return (
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty(g3 if has_b_ih else 0),
        w_ih.new_empty(g3 if has_b_hh else 0),
    )


def _gru_cell_bwd_fake(dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights, backend):
    return (
        x.new_empty(x.shape),
        hx.new_empty(hx.shape),
        *_weight_grad_fakes(w_ih, w_hh, has_b_ih, has_b_hh, need_weights),
    )


_gru_cell_bwd = Op("pyattn::gru_cell_bwd", _gru_cell_bwd_impl, _gru_cell_bwd_fake)


def _cell_setup(ctx, inputs, output):
    x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad, backend = inputs
    _, ws = output
    ctx.mark_non_differentiable(ws)
    ctx.set_materialize_grads(False)  # no zero tensor for the workspace per call
    ctx.save_for_backward(x, hx, w_ih, w_hh, b_ih, b_hh, ws)
    ctx.meta = (needs_grad, backend_request(backend))


def _cell_backward(ctx, dh, dws):
    x, hx, w_ih, w_hh, b_ih, b_hh, ws = ctx.saved_tensors
    if dh is None:
        return (None,) * 8
    needs_grad, backend = ctx.meta
    has_b_ih, has_b_hh = b_ih is not None, b_hh is not None
    if not needs_grad:  # the forward saved no workspace (direct op call with needs_grad=False): recompute it
        _, ws = _gru_cell_fwd(x, hx, w_ih, w_hh, b_ih, b_hh, True, backend)
    need = ctx.needs_input_grad
    need_w = any(need[2:6])
    dx, dhx, dw_ih, dw_hh, db_ih, db_hh = _gru_cell_bwd(
        dh.contiguous(), x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_w, backend
    )
    return (
        dx if need[0] else None,
        dhx if need[1] else None,
        dw_ih if need[2] else None,
        dw_hh if need[3] else None,
        db_ih if need[4] else None,
        db_hh if need[5] else None,
        None,
        None,
    )


_gru_cell_fwd = Op("pyattn::gru_cell_fwd", _gru_cell_fwd_impl, _gru_cell_fwd_fake, _cell_setup, _cell_backward)


# ---- ops (custom op + eager path, _common.Op): layer --------------------------------------------------------


def _gru_layer_fwd_impl(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    reverse: bool,
    needs_grad: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    """x (T, B, I), h0 (B, H) -> out (T, B, H), h_T (B, H) (the state after the last step processed), ws (T,
    B, 4H) fp32 (fp64 for fp64) or empty when not needs_grad."""
    inputs = GRULayerInputs(x, h0, w_ih, w_hh, b_ih, b_hh, needs_grad, reverse)
    be = select(inputs, backend)
    return be.gru_layer_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad)


def _gru_layer_fwd_fake(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad, backend):
    t = x.shape[0]
    b, h = h0.shape
    ws = x.new_empty((t, b, 4 * h) if needs_grad else (0,), dtype=ws_dtype(x.dtype))
    return x.new_empty((t, b, h)), h0.new_empty((b, h)), ws


def _gru_layer_bwd_impl(
    dout: Tensor,
    dh_last: Tensor,
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    out: Tensor,
    ws: Tensor,
    has_b_ih: bool,
    has_b_hh: bool,
    reverse: bool,
    need_weights: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BPTT -> dx (T, B, I), dh0 (B, H), dw_ih, dw_hh, db_ih, db_hh (empty when not asked for)."""
    inputs = GRULayerInputs(x, h0, w_ih, w_hh, None, None, True, reverse)
    be = select(inputs, backend)
    return be.gru_layer_bwd(
        dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse, need_weights
    )


def _gru_layer_bwd_fake(
    dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse, need_weights, backend
):
    return (
        x.new_empty(x.shape),
        h0.new_empty(h0.shape),
        *_weight_grad_fakes(w_ih, w_hh, has_b_ih, has_b_hh, need_weights),
    )


_gru_layer_bwd = Op("pyattn::gru_layer_bwd", _gru_layer_bwd_impl, _gru_layer_bwd_fake)


def _layer_setup(ctx, inputs, output):
    x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad, backend = inputs
    out, _, ws = output
    ctx.mark_non_differentiable(ws)
    ctx.set_materialize_grads(False)  # no zero tensor for the workspace per call; unused outputs' grads: None
    ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, out, ws)
    ctx.meta = (reverse, needs_grad, backend_request(backend))


def _layer_backward(ctx, dout, dh_last, dws):
    x, h0, w_ih, w_hh, b_ih, b_hh, out, ws = ctx.saved_tensors
    if dout is None and dh_last is None:
        return (None,) * 9
    dout = torch.zeros_like(out) if dout is None else dout
    dh_last = torch.zeros_like(h0) if dh_last is None else dh_last
    reverse, needs_grad, backend = ctx.meta
    has_b_ih, has_b_hh = b_ih is not None, b_hh is not None
    if not needs_grad:  # the forward saved no workspace (direct op call with needs_grad=False): recompute it
        out, _, ws = _gru_layer_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, True, backend)
    need = ctx.needs_input_grad
    need_w = any(need[2:6])
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = _gru_layer_bwd(
        dout.contiguous(),
        dh_last.contiguous(),
        x,
        h0,
        w_ih,
        w_hh,
        out,
        ws,
        has_b_ih,
        has_b_hh,
        reverse,
        need_w,
        backend,
    )
    return (
        dx if need[0] else None,
        dh0 if need[1] else None,
        dw_ih if need[2] else None,
        dw_hh if need[3] else None,
        db_ih if need[4] else None,
        db_hh if need[5] else None,
        None,
        None,
        None,
    )


_gru_layer_fwd = Op(
    "pyattn::gru_layer_fwd", _gru_layer_fwd_impl, _gru_layer_fwd_fake, _layer_setup, _layer_backward
)


# ---- public functions --------------------------------------------------------------------------------------


def _cell_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh):
    if not isinstance(input, Tensor):
        raise TypeError(f"gru_cell: input must be a Tensor, got {type(input).__name__}")
    nd = input.dim()
    if nd != 2 and nd != 1:
        raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {nd}D instead")
    batched = nd == 2
    if hx is not None and hx.dim() != nd:
        if hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        kind = "batched" if batched else "unbatched"
        raise RuntimeError(
            f"GRUCell: Expected hidden to be {nd}D like the input ({kind}), got {hx.dim()}D "
            f"(hidden of shape {list(hx.shape)}, input {list(input.shape)})"
        )
    x = input if batched else input.unsqueeze(0)
    if hx is None:
        hsz = weight_hh.shape[-1] if isinstance(weight_hh, Tensor) else 0
        h = torch.zeros(x.shape[0], hsz, dtype=x.dtype, device=x.device)
    else:
        h = hx if batched else hx.unsqueeze(0)
    _validate(x, h, weight_ih, weight_hh, bias_ih, bias_hh, "gru_cell")
    needs_grad = _needs_grad(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    args = (_unit_last(x), _unit_last(h), _unit_last(weight_ih), _unit_last(weight_hh), _unit_last(bias_ih),
            _unit_last(bias_hh), needs_grad)
    return args, batched


def gru_cell(
    input: Tensor,
    hx: Optional[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """``torch.gru_cell`` / ``nn.GRUCell`` semantics: input (B, I) or unbatched (I), hx (B, H) / (H) or None
    (zeros), weight_ih (3H, I), weight_hh (3H, H), biases (3H) or None -> h' (B, H) / (H)."""
    args, batched = _cell_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    h, _ = _gru_cell_fwd(*args, backend)
    return h if batched else h.squeeze(0)


def gru_layer(
    x: Tensor,
    h0: Optional[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    reverse: bool = False,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """One direction of one GRU layer: x (T, B, I) time-major, h0 (B, H) or None (zeros) -> (out (T, B, H),
    h_T (B, H)). ``reverse`` consumes x[T-1] first; out[t] is the state after consuming x[t] either way."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise RuntimeError(
            f"gru_layer: expected a 3-D time-major input (seq_len, batch, input_size), got "
            f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if h0 is None:
        hsz = weight_hh.shape[-1] if isinstance(weight_hh, Tensor) else 0
        h = torch.zeros(x.shape[1], hsz, dtype=x.dtype, device=x.device)
    else:
        if not isinstance(h0, Tensor) or h0.dim() != 2:
            raise RuntimeError(
                f"gru_layer: expected a 2-D h0 (batch, hidden_size), got "
                f"{list(h0.shape) if isinstance(h0, Tensor) else type(h0).__name__}"
            )
        h = h0
    _validate(x, h, weight_ih, weight_hh, bias_ih, bias_hh, "gru_layer")
    needs_grad = _needs_grad(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    args = tuple(_unit_last(t) for t in (x, h, weight_ih, weight_hh, bias_ih, bias_hh))
    out, h_last, _ = _gru_layer_fwd(*args, bool(reverse), needs_grad, backend)
    return out, h_last


def make_cell_inputs(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, **_) -> GRUCellInputs:
    """The GRUCellInputs a ``gru_cell`` call would dispatch on (for pyattn.explain)."""
    return GRUCellInputs(*_cell_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)[0])
