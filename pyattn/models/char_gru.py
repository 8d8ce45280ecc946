"""A character-level GRU language model built from pyattn.nn (the lecture's "h -> e -> l -> p" example)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn import GRU


class CharGRU(nn.Module):
    """Embedding -> pyattn.nn.GRU -> linear over the vocabulary."""

    def __init__(self, vocab: int, hidden: int = 64, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.gru = GRU(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, h = self.gru(self.embed(ids), h0)  # (B, T, H), (layers, B, H)
        return self.head(out), h  # logits (B, T, vocab)

    @torch.no_grad()
    def continue_text(self, prompt: Tensor, steps: int) -> list[int]:
        """Greedy continuation: feed the prompt once, then one character at a time carrying the state."""
        logits, h = self(prompt[None])
        nxt = int(logits[0, -1].argmax())
        out = [nxt]
        for _ in range(steps - 1):
            logits, h = self(torch.tensor([[nxt]], device=prompt.device), h)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
        return out


@dataclass
class DemoResult:
    text: str
    prompt: str
    continuation: str
    expected: str
    steps: int
    final_loss: float
    seconds: float

    @property
    def correct(self) -> bool:
        return self.continuation == self.expected


def train_on_text(text: str, prompt_len: int = 1, hidden: int = 64, steps: int = 300, lr: float = 1e-2,
                  device: str = "cpu", seed: int = 0, log=None) -> DemoResult:
    """Train next-character prediction on ``text`` (one sequence, full BPTT), then continue its first
    ``prompt_len`` characters for the rest of the text and compare."""
    torch.manual_seed(seed)
    chars = sorted(set(text))
    idx = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([idx[c] for c in text], device=device)
    model = CharGRU(len(chars), hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = ids[:-1][None], ids[1:][None]  # (1, T)
    t0 = time.perf_counter()
    for step in range(steps):
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(chars)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(step, loss.item())
    seconds = time.perf_counter() - t0
    prompt = text[:prompt_len]
    cont = model.continue_text(ids[:prompt_len], len(text) - prompt_len)
    return DemoResult(text, prompt, "".join(chars[i] for i in cont), text[prompt_len:], steps, loss.item(), seconds)
