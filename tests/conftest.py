"""Test setup: the Triton interpreter on machines without CUDA (set before anything imports triton),
and `gpu` tests skipped there with a stated reason."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyattn  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same RNG state (TESTING.md: fixed seeds, no flaky reruns)."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def backend_params(op: str, device: str = "cpu"):
    """pytest params for every backend that implements `op`, each skipped with its reason when unavailable here."""
    from pyattn.dispatch import get_backend
    from pyattn.dispatch.registry import _BACKENDS

    params = []
    for name, b in _BACKENDS.items():
        if op not in b.caps or device not in b.caps[op].devices:
            continue
        ok, why = b.availability()
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name} unavailable: {why}")]
        if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            marks = [pytest.mark.skip(reason="triton on CPU needs TRITON_INTERPRET=1")]
        params.append(pytest.param(get_backend(name).name, marks=marks, id=name))
    return params
