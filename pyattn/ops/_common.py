"""Helpers shared by the op files: error texts that name the argument."""
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
