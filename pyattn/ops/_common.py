"""Helpers shared by the op files: error texts that name the argument; Op (custom op + eager path)."""
from __future__ import annotations

from typing import Optional

import torch


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "")


def check_same_device(**tensors) -> None:
    items = [(k, t) for k, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on {t.device} and "
                               f"{first_name} is on {first.device}")


# ---- torch.autocast ------------------------------------------------------------------------------------------

def _autocast_region_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of an enabled torch.autocast region for ``device_type``, or None outside one."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch without the per-device forms (older than 2.4)
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def autocast_lower_precision(*tensors):
    """torch.autocast's lower-precision policy (what it applies to F.scaled_dot_product_attention): inside an
    enabled region for the first tensor's device, its floating tensors on that device other than float64 cast to
    the region's dtype; the arguments unchanged outside one. (pyattn's ops bypass the dispatcher, where autocast
    would otherwise apply it.)"""
    first = tensors[0]
    if not isinstance(first, _Tensor):
        return tensors
    device_type = first.device.type
    dtype = _autocast_region_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if (isinstance(t, _Tensor) and t.is_floating_point() and t.dtype != torch.float64
                                 and t.device.type == device_type) else t for t in tensors)


# ---- ops: a torch custom op, and a direct path for plain eager calls ---------------------------------

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
# Bound once: this runs on every op call (twice for a forward + backward), where attribute lookups through torch._C
# and a generator over the arguments cost more than the checks themselves.
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_function_mode_on = torch._C._is_torch_function_mode_enabled
_functorch_top = torch._C._functorch.peek_interpreter_stack


def plain_eager(args) -> bool:
    """True when a call may run an op's implementation directly: no torch.compile / export / jit tracing, no
    dispatch mode (FakeTensorMode, proxy tracing, FlopCounterMode, ...), no torch function mode, no functorch
    transform (vmap, grad), and only plain, non-meta tensors or Parameters among the arguments. Anything else
    takes the registered custom op, which those systems understand."""
    if (_is_compiling() or _is_tracing() or _dispatch_stack_len() > 0 or _function_mode_on()
            or _functorch_top() is not None):
        return False
    for a in args:
        t = type(a)
        if t is _Tensor or t is _Parameter:
            if a.is_meta:
                return False
        elif a is not None and t is not bool and isinstance(a, _Tensor):  # (None and flags: the common non-tensors)
            return False
    return True


class Op:
    """One pyattn op, defined once by ``impl`` (a typed function that checks, selects a backend and runs it)
    and registered as the torch custom op ``name`` with ``fake`` and, when differentiable, the autograd
    formula (``setup_context``, ``backward``). A call runs that impl and formula one of two ways:

    * plain eager calls (see plain_eager): impl directly, inside a torch.autograd.Function made of the same
      setup_context/backward when autograd records the call. This skips torch's custom-op dispatch, tens of
      microseconds per call (several times the kernel time of a small layer's attention on CPU);
    * otherwise the custom op, which torch.compile, export, vmap, fake tensors and opcheck see.

    Both give the same results (tests/test_op_paths.py)."""

    def __init__(self, name: str, impl, fake, setup_context=None, backward=None):
        self.name = name
        self.impl = impl
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self.op.register_fake(fake)
        self.function = None
        if backward is not None:
            self.op.register_autograd(_differentiable_once(backward), setup_context=setup_context)
            self.function = _autograd_function(name, impl, setup_context, backward)

    def __call__(self, *args):
        if not plain_eager(args):
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return self.function.apply(*args)
        return self.impl(*args)


_DelayedError = torch._C._functions.DelayedError


def _differentiable_once(fn):
    """torch.autograd.function.once_differentiable, except that under create_graph=True every gradient is marked
    (raises when differentiated again): torch's marks them only when an incoming gradient requires grad, so the
    gradient of ``out.sum()`` (whose incoming gradient is a constant) came out as a constant, and a second
    derivative through the op's saved inputs (a gradient penalty, a Hessian-vector product) was silently 0."""

    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = fn(ctx, *grads)
        if not torch.is_grad_enabled():  # (backward runs in grad mode only under create_graph=True)
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        # The error node also takes the saved inputs that require grad (outputs dropped): it is then on the path from
        # the gradients back to those inputs, so torch.autograd.grad(g, x) reaches it and raises too (without them it
        # said "x appears to not have been used in the graph", or returned None under allow_unused).
        anchors = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        err = _DelayedError(b"pyattn ops are differentiable once: a gradient of their gradient is not implemented",
                            len(outs) + len(anchors))

        def marked(t):
            if t is None:
                return None
            t = t.detach()
            t.requires_grad = True
            return t

        return tuple(err(*[marked(t) for t in outs], *anchors)[:len(outs)])

    return wrapper


def _autograd_function(name: str, impl, setup_context, backward):
    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    @_differentiable_once
    def backward_(ctx, *grads):
        return backward(ctx, *grads)

    return type(
        name.replace("::", "_"),
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_)},
    )
