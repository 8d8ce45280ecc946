"""``pyattn demo transformer``: a small encoder-decoder Transformer learns to translate numbers written in digits into
English words ("40213" -> "forty thousand two hundred thirteen"), trained on CPU in about a minute.

The task: numbers of 1 to ``max_digits`` digits (the digit count drawn uniformly, then the number uniformly among
those with that many digits), source = the digits, target = the words (``number_to_words``; no "and", no hyphens).
A fixed tenth of all numbers (chosen by a hash of the number) is held out: training never sees them, accuracy is
measured on them (exact match of the greedy translation with the reference, whole sequence).

Training: Adam (betas 0.9 / 0.98, eps 1e-9, as in the paper), linear warm-up then cosine decay of the learning
rate over the step / time budget, label smoothing 0.1, gradient clipping at 1.0.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .transformer import EncoderDecoderTransformer, TransformerConfig

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = ["", "thousand", "million", "billion"]
SRC_VOCAB = SPECIALS + list("0123456789")
TGT_VOCAB = SPECIALS + ONES + TENS[2:] + ["hundred"] + SCALES[1:]


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10])
        n %= 10
        if n:
            words.append(ONES[n])
    elif n:
        words.append(ONES[n])
    return words


def number_to_words(n: int) -> list[str]:
    """0 <= n < 10^12 -> English words, e.g. 40213 -> ['forty', 'thousand', 'two', 'hundred', 'thirteen']."""
    if not 0 <= n < 1000 ** len(SCALES):
        raise ValueError(f"n must be in [0, 10^{3 * len(SCALES)}), got {n}")
    if n == 0:
        return ["zero"]
    groups, words = [], []
    while n:
        groups.append(n % 1000)
        n //= 1000
    for i in reversed(range(len(groups))):
        if groups[i]:
            words += _below_thousand(groups[i]) + ([SCALES[i]] if i else [])
    return words


def is_held_out(n: int) -> bool:
    """The fixed held-out tenth of all numbers (a multiplicative hash, so it is spread over every size)."""
    return (n * 2654435761 + 12345) % 4294967296 % 10 == 0


@dataclass
class NumberTask:
    """Digits -> words for numbers of 1..``max_digits`` digits."""

    max_digits: int = 6
    src_index: dict = field(default_factory=lambda: {t: i for i, t in enumerate(SRC_VOCAB)})
    tgt_index: dict = field(default_factory=lambda: {t: i for i, t in enumerate(TGT_VOCAB)})

    def __post_init__(self) -> None:
        if not 1 <= self.max_digits <= 3 * len(SCALES):
            raise ValueError(f"max_digits must be in [1, {3 * len(SCALES)}], got {self.max_digits}")

    @property
    def max_src_len(self) -> int:
        return self.max_digits

    @property
    def max_tgt_len(self) -> int:  # words + eos; the longest is 7...7 repeated (e.g. 777777: 9 words)
        return max(len(number_to_words(int("7" * d))) for d in range(1, self.max_digits + 1)) + 1

    def sample(self, rng: random.Random, held_out: bool) -> int:
        while True:
            d = rng.randint(1, self.max_digits)
            n = rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)
            if is_held_out(n) == held_out:
                return n

    def encode_src(self, numbers: list[int], device="cpu") -> torch.Tensor:
        """(B, max_digits) digit ids, right-padded with PAD."""
        out = torch.full((len(numbers), self.max_src_len), PAD, dtype=torch.long)
        for i, n in enumerate(numbers):
            ids = [self.src_index[ch] for ch in str(n)]
            out[i, :len(ids)] = torch.tensor(ids)
        return out.to(device)

    def encode_tgt(self, numbers: list[int], device="cpu") -> torch.Tensor:
        """(B, max_tgt_len) word ids followed by EOS, right-padded with PAD."""
        out = torch.full((len(numbers), self.max_tgt_len), PAD, dtype=torch.long)
        for i, n in enumerate(numbers):
            ids = [self.tgt_index[w] for w in number_to_words(n)] + [EOS]
            out[i, :len(ids)] = torch.tensor(ids)
        return out.to(device)

    @staticmethod
    def decode_tgt(ids) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i in (EOS, PAD):
                break
            words.append(TGT_VOCAB[i])
        return " ".join(words)


def demo_config(task: NumberTask, d_model: int = 128, layers: int = 2, dropout: float = 0.0) -> TransformerConfig:
    return TransformerConfig(len(SRC_VOCAB), len(TGT_VOCAB), d_model=d_model, nhead=4, num_encoder_layers=layers,
                             num_decoder_layers=layers, dim_feedforward=2 * d_model, dropout=dropout,
                             max_len=max(task.max_src_len, task.max_tgt_len) + 1, tie_embeddings=True,
                             pad_id=PAD, bos_id=BOS, eos_id=EOS)


@dataclass
class TrainResult:
    model: EncoderDecoderTransformer
    task: NumberTask
    steps: int
    seconds: float
    losses: list                      # (step, loss) for every step
    accuracy: float                   # held-out exact match, greedy
    eval_numbers: list
    predictions: list                 # greedy translations of eval_numbers (strings)

    @property
    def final_loss(self) -> float:
        tail = [loss for _, loss in self.losses[-20:]]
        return sum(tail) / len(tail)


@torch.no_grad()
def exact_match(model: EncoderDecoderTransformer, task: NumberTask, numbers: list[int], device="cpu",
                num_beams: int = 1, batch_size: int = 500) -> tuple[float, list[str]]:
    """Fraction of ``numbers`` whose generated translation equals the reference, and the translations."""
    preds = []
    for i in range(0, len(numbers), batch_size):
        chunk = numbers[i:i + batch_size]
        out = model.generate(task.encode_src(chunk, device), task.max_tgt_len, num_beams=num_beams)
        preds += [task.decode_tgt(row) for row in out.tolist()]
    right = sum(p == " ".join(number_to_words(n)) for p, n in zip(preds, numbers))
    return right / max(1, len(numbers)), preds


def _lr(progress: float, peak: float, warmup: float) -> float:
    if progress < warmup:
        return peak * (progress / warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train(max_digits: int = 6, steps: int = 1500, seconds: Optional[float] = None, batch_size: int = 128,
          d_model: int = 128, layers: int = 2, lr: float = 2e-3, warmup: float = 0.05, label_smoothing: float = 0.1,
          eval_size: int = 1000, device: str = "cpu", seed: int = 0,
          progress: Optional[Callable[[int, float, float], None]] = None) -> TrainResult:
    """Train on the number task for ``steps`` steps, or until ``seconds`` have passed if that comes first (the
    learning-rate schedule follows whichever budget is nearer its end), then measure held-out exact match on
    ``eval_size`` held-out numbers. ``progress(step, loss, fraction_of_budget)`` is called after every step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    task = NumberTask(max_digits)
    model = EncoderDecoderTransformer(demo_config(task, d_model, layers)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)
    eval_rng = random.Random(seed + 1)
    eval_numbers = [task.sample(eval_rng, held_out=True) for _ in range(eval_size)]
    losses = []
    t0 = time.perf_counter()
    step = 0
    frac = 0.0
    while step < steps and frac < 1.0:
        numbers = [task.sample(rng, held_out=False) for _ in range(batch_size)]
        src = task.encode_src(numbers, device)
        tgt = task.encode_tgt(numbers, device)                                      # (B, T) words + EOS
        dec_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)  # BOS + words
        for g in opt.param_groups:
            g["lr"] = _lr(frac, lr, warmup)
        model.train()
        logits = model(src, dec_in)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=PAD,
                               label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t0
        frac = max(step / steps, elapsed / seconds if seconds else 0.0)
        losses.append((step, loss.item()))
        if progress is not None:
            progress(step, loss.item(), min(frac, 1.0))
    seconds_used = time.perf_counter() - t0
    model.eval()
    acc, preds = exact_match(model, task, eval_numbers, device)
    return TrainResult(model, task, step, seconds_used, losses, acc, eval_numbers, preds)


def plot_losses(result: TrainResult, path: str) -> str:
    """Write the training-loss curve (and the final held-out accuracy in the title) to a PNG at ``path``."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [s for s, _ in result.losses]
    ys = [v for _, v in result.losses]
    ax.plot(xs, ys, linewidth=0.8, alpha=0.5, label="train loss (per step)")
    w = max(1, len(ys) // 50)
    if len(ys) >= w:
        smooth = [sum(ys[i - w + 1:i + 1]) / w for i in range(w - 1, len(ys))]
        ax.plot(xs[w - 1:], smooth, linewidth=1.6, label=f"moving average ({w} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (label smoothing 0.1)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"digits -> words, up to {result.task.max_digits} digits: held-out exact match "
                 f"{100 * result.accuracy:.1f}% after {result.steps} steps ({result.seconds:.0f} s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


DEFAULT_STEPS = 600


def run_demo(device: str = "cpu", steps: Optional[int] = None, seconds: Optional[float] = None, seed: int = 0,
             out: str = "pyattn_demo_transformer_loss.png", max_digits: int = 6, examples: int = 6,
             num_beams: int = 4, threshold: float = 0.95, threads: Optional[int] = None, print_fn=print) -> int:
    """``pyattn demo transformer``: train with a tqdm progress bar, report loss and held-out exact match (greedy and
    beam search), write the loss curve, decode a few held-out numbers. Exit status 0 when the greedy held-out exact
    match exceeds ``threshold``, 1 otherwise, 2 for bad arguments. ``threads``: torch's CPU thread count for the run
    (restored afterwards); on a 2-core machine shared with other busy processes, 2 spinning OpenMP threads can make
    every step 10x slower than 1 thread."""
    import sys

    steps = DEFAULT_STEPS if steps is None else steps
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        print(f"pyattn demo transformer: bad --device {device!r}: {e}", file=sys.stderr)
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("pyattn demo transformer: --device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    if steps < 1 or (seconds is not None and seconds <= 0) or not 1 <= max_digits <= 3 * len(SCALES) \
            or (threads is not None and threads < 1):
        print(f"pyattn demo transformer: need --steps >= 1, --seconds > 0, 1 <= --digits <= {3 * len(SCALES)} and "
              f"--threads >= 1 (got {steps}, {seconds}, {max_digits}, {threads})", file=sys.stderr)
        return 2
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(dev, steps, seconds, seed, out, max_digits, examples, num_beams, threshold, print_fn)
    finally:
        torch.set_num_threads(old_threads)


def _run_demo(dev, steps, seconds, seed, out, max_digits, examples, num_beams, threshold, print_fn) -> int:
    import sys

    import pyattn

    task = NumberTask(max_digits)
    cfg = demo_config(task)
    probe = torch.zeros(1, cfg.nhead, 4, cfg.d_model // cfg.nhead, device=dev)
    print_fn(pyattn.explain("attention", probe, probe, probe).splitlines()[1].strip())
    n_params = sum(p.numel() for p in EncoderDecoderTransformer(cfg).parameters())
    budget = f"{steps} steps" + (f" or {seconds:g} s" if seconds else "")
    print_fn(f"task: numbers of 1-{max_digits} digits -> English words, e.g. 40213 -> "
             f"{' '.join(number_to_words(40213))!r}; a tenth of all numbers held out")
    print_fn(f"model: encoder-decoder Transformer, {cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, "
             f"d_model {cfg.d_model}, {cfg.nhead} heads, d_ff {cfg.dim_feedforward}, {n_params / 1e3:.0f}k parameters; "
             f"training {budget} on {dev}" + (f" ({torch.get_num_threads()} threads)" if dev.type == "cpu" else "")
             + ", batch 128")
    try:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    except ImportError:  # tqdm is not a dependency of pyattn: plain progress lines instead
        bar = None

    def progress(step, loss, frac):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        elif step % 50 == 0:
            print_fn(f"  step {step:5d}  loss {loss:.4f}")

    try:
        res = train(max_digits, steps=steps, seconds=seconds, device=str(dev), seed=seed, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    first = sum(v for _, v in res.losses[:20]) / len(res.losses[:20])
    print_fn(f"trained {res.steps} steps in {res.seconds:.1f} s ({res.steps / res.seconds:.1f} steps/s); "
             f"train loss {first:.3f} -> {res.final_loss:.3f} (mean of the first / last 20 steps; label smoothing "
             "0.1 puts the floor near 0.6)")
    beam_n = min(len(res.eval_numbers), 200)
    beam_acc, beam_preds = exact_match(res.model, task, res.eval_numbers[:beam_n], str(dev), num_beams=num_beams)
    print_fn(f"held-out exact match: greedy {100 * res.accuracy:.1f}% ({len(res.eval_numbers)} numbers), "
             f"beam search ({num_beams} beams) {100 * beam_acc:.1f}% (first {beam_n})")
    try:
        print_fn(f"loss curve: {plot_losses(res, out)}")
    except ImportError:
        print_fn("loss curve: not written (matplotlib is not installed: pip install matplotlib)")
    print_fn("held-out examples (greedy | beam):")
    for n, greedy, beam in list(zip(res.eval_numbers, res.predictions, beam_preds))[:examples]:
        ref = " ".join(number_to_words(n))
        mark = "ok" if greedy == ref and beam == ref else "WRONG"
        print_fn(f"  {n:>{max_digits}d} -> {greedy!r} | {beam!r}  [{mark}]")
    ok = res.accuracy > threshold
    print_fn(f"{'PASS' if ok else 'FAIL'}: greedy held-out exact match {100 * res.accuracy:.1f}% "
             f"{'>' if ok else '<='} {100 * threshold:.0f}%")
    return 0 if ok else 1
