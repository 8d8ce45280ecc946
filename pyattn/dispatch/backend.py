"""The Backend base class: what a backend can do, and why it refuses an input."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class OpInputs:
    """Base of the per-op input dataclasses (pyattn/ops/*): validated tensors and flags of one call.

    ``signature()`` is what selection is cached on: everything a backend's refusal may depend on.
    """

    op: str = ""

    def signature(self) -> tuple:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def nothing_to_compute(self) -> bool:
        """True when the call has no element to compute (an empty input): select() then takes the torch backend,
        whose ops make the empty or zero outputs without a kernel, whatever backend was asked for."""
        return False


@dataclass(frozen=True)
class OpCaps:
    """What a backend supports for one op. Generic checks run from these; ``Backend.extra_reasons`` adds the rest."""

    devices: frozenset = frozenset({"cpu"})
    dtypes: frozenset = frozenset({torch.float32})
    notes: tuple = field(default_factory=tuple)


class Backend:
    """A way to run ops. Subclasses set ``name`` and ``caps`` ({op: OpCaps}) and implement the op methods."""

    name: str = ""
    caps: dict = {}
    description: str = ""

    def availability(self) -> tuple[bool, str]:
        """(available, reason when not). Must be cheap after the first call and never raise."""
        return True, ""

    def preferred_for(self, inputs: OpInputs) -> bool:
        """True where this backend, though not first in the op's priority list, was measured the fastest for these
        inputs: selection then tries it first. Must be cheap, never raise, and depend on nothing but what
        ``inputs.signature()`` holds (selection is cached on it) and the machine."""
        return False

    def extra_reasons(self, inputs: OpInputs) -> list[str]:
        """Op-specific refusals beyond device/dtype (head dim, hidden size, masks, dropout, ...)."""
        return []

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        ok, why = self.availability()
        if not ok:
            return [f"{self.name} backend unavailable: {why}"]
        caps = self.caps.get(inputs.op)
        if caps is None:
            return [f"{self.name} backend does not implement {inputs.op}"]
        reasons = []
        dev = inputs.device.type
        if dev not in caps.devices:
            reasons.append(f"device {dev} not supported (supports {', '.join(sorted(caps.devices))})")
        dtype = inputs.dtype
        if dtype not in caps.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in caps.dtypes))
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} not supported (supports {names})")
        if not reasons:
            reasons.extend(self.extra_reasons(inputs))
        return reasons

    def __repr__(self) -> str:
        return f"<pyattn backend {self.name}>"
