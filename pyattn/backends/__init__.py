"""Backends, registered in import order. ``torch`` first: it is the fallback for everything."""
from . import torch as _torch  # noqa: F401
from . import cpp as _cpp  # noqa: F401
from . import triton as _triton  # noqa: F401
from . import cuda as _cuda  # noqa: F401
