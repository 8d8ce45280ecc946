"""Backend selection: capabilities and refusals as data, one priority list per (op, device)."""
from .backend import Backend, OpInputs
from .registry import (PRIORITY, BackendNotSupported, backend_request, backends, explain_inputs, get_backend,
                       register, select, use_backend)

__all__ = ["Backend", "OpInputs", "PRIORITY", "BackendNotSupported", "backend_request", "backends",
           "explain_inputs", "get_backend", "register", "select", "use_backend"]
