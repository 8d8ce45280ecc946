"""Profile inputs for the Hopper attention kernels, for the next round of tuning on a GPU machine (Nsight Compute and
the SASS; neither can run here). Two modes:

    ncu --section ... python scripts/attn_profile.py run    one launch each of the default forward (bf16, B = 4,
        H = 16, L = 4096, D = 128; non-causal: the warp-specialized kernel with 176-key blocks, causal: 128-key
        blocks) and one backward (non-causal: the pre kernel, the dK / dV and the dQ kernels), after an unprofiled
        warm-up pass (ncu's --kernel-name / --launch-skip pick the launches: scripts/gpu_lease.sh)
    python scripts/attn_profile.py sass OUT                   the SASS of those kernels in pyattn._C (cuobjdump,
        which the CUDA toolkit has), one file per kernel under OUT, for the offline reading docs/design.md describes
        (where the wgmma waits sit against the softmax, what the compiler predicated into the loop), and
        scripts/sass_rules.py's rules on every sm90 kernel of the extension as built there
"""
from __future__ import annotations

import os
import re
import sys

# the kernels `sass` extracts (a regex on the mangled names) -> the file each goes to
SASS_KERNELS = {
    r"attn_fwd_sm90_ws_kernelINS1_4BF16ELi128ELi176ELb0ELb0E": "sass-attn-fwd-ws-hd128-bn176.txt",
    r"attn_fwd_sm90_ws_kernelINS1_4BF16ELi128ELi128ELb1ELb0E": "sass-attn-fwd-ws-hd128-causal.txt",
    r"attn_bwd_dkdv_sm90_kernelINS1_4BF16ELi128ELb0E": "sass-attn-bwd-dkdv-hd128.txt",
    r"attn_bwd_dq_sm90_kernelINS1_4BF16ELi128ELb0E": "sass-attn-bwd-dq-hd128.txt",
}


def run() -> int:
    import torch

    import pyattn

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def once():  # 4 launches of kernels named *sm90*: the forward, dK / dV, dQ, the causal forward
        out = pyattn.scaled_dot_product_attention(q, k, v, backend="cuda")
        torch.autograd.grad(out, (q, k, v), dout)  # (also the pre kernel, whose name ncu's filter leaves out)
        with torch.no_grad():
            pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")

    once()  # warm-up (ncu skips these launches: --launch-skip in gpu_lease.sh)
    torch.cuda.synchronize()
    once()
    torch.cuda.synchronize()
    return 0


def sass(out_dir: str) -> int:
    import pyattn._C as ext

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sass_rules

    tool = sass_rules.find_cuobjdump()  # (with an nvdisasm, which cuobjdump -sass runs)
    if tool is None:
        print("attn_profile: no cuobjdump + nvdisasm (PATH, $CUDA_HOME/bin, the NVIDIA wheels)", file=sys.stderr)
        return 1
    text = sass_rules.sass_text(tool, ext.__file__)
    # cuobjdump prints each function as a "Function : <mangled name>" header followed by its code
    blocks = re.split(r"(?m)^\s*Function : ", text)[1:]
    os.makedirs(out_dir, exist_ok=True)
    missing = 0
    for pattern, name in SASS_KERNELS.items():
        found = [b for b in blocks if re.search(pattern, b.splitlines()[0])]
        if not found:
            print(f"attn_profile: no kernel matches {pattern}", file=sys.stderr)
            missing += 1
            continue
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("Function : " + found[0])
        print(f"{name}: {len(found[0].splitlines())} lines")
    # the compile check's machine-code rules (scripts/sass_rules.py) on the extension as built here
    kernels = {n: ins for n, ins in sass_rules.parse_sass(text).items() if "sm90" in n}
    problems = [f"{n}: {pr}" for n, ins in kernels.items() for pr in sass_rules.check_kernel(n, ins)[0]]
    print(f"sass rules: {len(kernels)} sm90 kernels, {len(problems)} problems")
    for pr in problems:
        print("  " + pr)
    return 1 if missing or problems else 0


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        return run()
    if len(sys.argv) == 3 and sys.argv[1] == "sass":
        return sass(sys.argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
