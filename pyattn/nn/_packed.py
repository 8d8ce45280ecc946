"""PackedSequence plans for pyattn.nn.GRU: variable-length sequences on the fused layer op.

torch's PackedSequence holds the rows of B sequences time-major: step t's rows are the sequences still running at t
(batch_sizes[t] of them, a prefix, since the sequences are sorted longest first), contiguous at offset off[t].
GRU rows are independent, so a stretch of steps can run as one gru_layer call on the batch of its first step:
sequences that end inside the stretch keep running on zero inputs, their extra steps are never read, and each
one's final state is taken at its own last step. A call costs a fixed overhead (launches, weight packing, the
Python op path) plus work per row and step, so the plan splits the steps into groups greedily: a run of steps with
the same batch joins the current group while the rows it would compute for nothing (steps x rows that have ended)
stay under ``merge_rows``; otherwise it opens a group. merge_rows = inf (the default on GPUs, where a step costs
about the same at any batch) is one call per layer direction on the padded batch; 0 is one call per run of equal
batch size, with no padding at all.

The reverse direction reads each sequence from its own last step. It runs as the forward direction on the
sequences reversed in place (a fixed permutation of the packed rows, ``rev``, its own inverse), so the same plan
serves it; its final state is the reversed sequence's last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

# Row-steps of padding a CPU group may take on before a new call is cheaper: the best of 0 / 16 / 64 / 256 / inf
# measured on four shapes (docs/design.md, "Packed sequences").
CPU_MERGE_ROWS = 16


@dataclass
class _Group:
    r0: int  # first packed row of the group
    r1: int  # one past its last
    steps: int
    batch: int  # rows computed each step (the batch of the group's first step)
    pad: Optional[Tensor]  # positions of the packed rows in the (steps * batch) padded rows; None: no padding
    ends: Tensor  # positions in the padded rows of the final states of the sequences that end in the group
    carry: int  # rows still running after the group (the next group's batch)


class PackedPlan:
    """Groups of steps for packed rows with ``batch_sizes`` (CPU int64, non-increasing), on ``device``."""

    @torch.compiler.disable  # (host-side bookkeeping on the CPU batch sizes: eager under torch.compile)
    def __init__(self, batch_sizes: Tensor, device: torch.device, merge_rows: float, reverse: bool):
        bs = batch_sizes.tolist()
        self.batch = bs[0]
        sizes, counts = torch.unique_consecutive(batch_sizes, return_counts=True)
        runs = list(zip(sizes.tolist(), counts.tolist()))  # (batch, steps) in time order
        off = [0]
        for b in bs:
            off.append(off[-1] + b)
        lengths = (batch_sizes[None, :] > torch.arange(self.batch)[:, None]).sum(1)  # (B,) sorted, longest first
        self.groups: list[_Group] = []
        t = 0
        k = 0
        while k < len(runs):
            batch, steps = runs[k]
            k += 1
            while k < len(runs) and runs[k][1] * (batch - runs[k][0]) <= merge_rows:  # (inf: always)
                steps += runs[k][1]
                k += 1
            carry = runs[k][0] if k < len(runs) else 0
            active = torch.tensor(bs[t:t + steps])[:, None] > torch.arange(batch)[None, :]  # (steps, batch)
            pad = None if bool(active.all()) else active.flatten().nonzero().flatten().to(device)
            ending = torch.arange(carry, batch)  # rows whose last step is in this group
            ends = ((lengths[carry:batch] - 1 - t) * batch + ending).to(device)
            self.groups.append(_Group(off[t], off[t + steps], steps, batch, pad, ends, carry))
            t += steps
        self.rev = None
        if reverse:  # packed row of (t, i) -> packed row of (lengths[i] - 1 - t, i)
            steps_of = torch.arange(len(bs))[:, None].expand(len(bs), self.batch)
            rows_of = torch.arange(self.batch)[None, :].expand(len(bs), self.batch)
            valid = rows_of < batch_sizes[:, None]
            t_all, i_all = steps_of[valid], rows_of[valid]
            self.rev = (torch.tensor(off[:-1])[lengths[i_all] - 1 - t_all] + i_all).to(device)

    @staticmethod
    def merge_rows_for(device: torch.device) -> float:
        return CPU_MERGE_ROWS if device.type == "cpu" else math.inf

    def run(self, x: Tensor, h0: Tensor, layer: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
            reverse: bool) -> tuple[Tensor, Tensor]:
        """One layer direction: x (N, I) packed rows, h0 (B, H) in sorted order, layer(x (T, b, I), h (b, H)) ->
        (out (T, b, H), h_T) a forward gru_layer. Returns the packed output rows (N, H) and the final states
        (B, H)."""
        if reverse:
            x = x.index_select(0, self.rev)
        outs, finals = [], []
        h = h0
        for g in self.groups:
            xg = x[g.r0:g.r1]
            if g.pad is not None:
                xg = xg.new_zeros(g.steps * g.batch, xg.shape[1]).index_copy(0, g.pad, xg)
            out, h = layer(xg.view(g.steps, g.batch, -1), h[:g.batch])
            flat = out.reshape(g.steps * g.batch, -1)
            outs.append(flat if g.pad is None else flat.index_select(0, g.pad))
            if g.carry < g.batch:
                finals.append(flat.index_select(0, g.ends))
        out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
        h_last = torch.cat(finals[::-1], 0) if len(finals) > 1 else finals[0]
        return (out.index_select(0, self.rev) if reverse else out), h_last
