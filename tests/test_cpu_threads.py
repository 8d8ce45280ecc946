"""The C++ CPU kernels' threading (csrc/include/pyattn/cpu_parallel.h: parallel loops on torch's OpenMP team).

A forked child that sets one thread, as torch's DataLoader workers do, must run every kernel (no wait on threads
that do not exist in the child) and get the parent's bits. Run in a subprocess: forking pytest's own process (or an
xdist worker) would be fragile.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from pyattn.dispatch import get_backend

if not get_backend("cpp").availability()[0]:
    pytest.skip(f"cpp backend unavailable: {get_backend('cpp').availability()[1]}", allow_module_level=True)

SCRIPT = textwrap.dedent("""
    import os, sys, torch, pyattn
    torch.set_num_threads(2)
    torch.manual_seed(0)
    q = torch.randn(4, 8, 200, 64, requires_grad=True)
    x = torch.randn(2048, 512)
    gru = pyattn.nn.GRU(64, 128)
    inp = torch.randn(40, 4, 64)

    def run():
        out = pyattn.scaled_dot_product_attention(q, q, q, is_causal=True, backend="cpp")
        (dq,) = torch.autograd.grad(out.sum(), (q,))
        return [out.detach(), dq, pyattn.layer_norm(x, (512,), backend="cpp"), gru(inp)[0].detach()]

    parent = run()
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        child = run()
        os._exit(0 if all(torch.equal(a, b) for a, b in zip(parent, child)) else 3)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_forked_child_with_one_thread_runs_every_kernel_with_the_parents_bits():
    # no GPU in the child: on a CUDA machine torch's autograd engine keeps a thread per device, and refuses a
    # backward in a forked child of a process that used it (the CPU kernels are what this tests)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"exit {res.returncode} (3: different bits in the child)\n{res.stderr[-2000:]}"
