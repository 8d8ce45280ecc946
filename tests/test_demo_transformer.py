"""`pyattn demo transformer`: the digits -> words task, and a short run of the demo that must learn it.

The full demo (6 digits, 600 steps, about a minute) reaches > 95% held-out exact match; here a smaller variant
(numbers of up to 4 digits, 120 steps, one torch thread: about 25 s on 2 cores busy with other work) must pass 60%
(it reaches 79% with this seed), far above what an untrained or broken model gets (0%), and the loss curve must be
written. One thread because on a shared 2-core machine two spinning OpenMP threads make each step up to 10x slower.
"""
from __future__ import annotations

import random
import re

import pytest
import torch

from pyattn.cli import main
from pyattn.models.translation_demo import (EOS, PAD, TGT_VOCAB, NumberTask, exact_match, is_held_out,
                                            number_to_words)


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (40, "forty"), (99, "ninety nine"),
    (100, "one hundred"), (101, "one hundred one"), (110, "one hundred ten"), (1000, "one thousand"),
    (1001, "one thousand one"), (40213, "forty thousand two hundred thirteen"), (100000, "one hundred thousand"),
    (999999, "nine hundred ninety nine thousand nine hundred ninety nine"), (1000010, "one million ten"),
    (2000300000, "two billion three hundred thousand"),
])
def test_number_to_words(n, words):
    assert " ".join(number_to_words(n)) == words


def test_number_to_words_rejects_out_of_range():
    with pytest.raises(ValueError, match="n must be"):
        number_to_words(-1)
    with pytest.raises(ValueError, match="n must be"):
        number_to_words(10 ** 12)


def test_task_encoding_and_held_out_split():
    task = NumberTask(4)
    assert 0.08 < sum(is_held_out(n) for n in range(10000)) / 10000 < 0.12
    rng = random.Random(0)
    train = [task.sample(rng, held_out=False) for _ in range(2000)]
    held = [task.sample(rng, held_out=True) for _ in range(200)]
    assert not any(is_held_out(n) for n in train) and all(is_held_out(n) for n in held)
    assert {len(str(n)) for n in train} == {1, 2, 3, 4}                 # every size is drawn
    src, tgt = task.encode_src([7, 1234]), task.encode_tgt([7, 1234])
    assert src.shape == (2, 4) and src[0, 1:].eq(PAD).all() and not src[1].eq(PAD).any()
    assert task.decode_tgt(tgt[1]) == "one thousand two hundred thirty four"
    assert tgt[0, 1] == EOS and tgt.shape[1] == task.max_tgt_len
    assert task.max_tgt_len == len(number_to_words(7777)) + 1
    assert all(w in TGT_VOCAB for n in range(0, 10 ** 6, 997) for w in number_to_words(n))


def test_untrained_model_scores_zero():
    """The accuracy measure is not trivially satisfied."""
    from pyattn.models.translation_demo import demo_config
    from pyattn.models import EncoderDecoderTransformer

    task = NumberTask(4)
    model = EncoderDecoderTransformer(demo_config(task)).eval()
    acc, preds = exact_match(model, task, [12, 345, 6789], "cpu")
    assert acc == 0.0 and len(preds) == 3


def test_short_demo_run_learns_and_writes_the_loss_curve(tmp_path, capsys):
    out = tmp_path / "plots" / "loss.png"
    threads = torch.get_num_threads()
    rc = main(["demo", "transformer", "--steps", "120", "--digits", "4", "--seed", "0", "--threads", "1",
               "--out", str(out)])
    assert torch.get_num_threads() == threads                       # restored
    text = capsys.readouterr().out
    greedy = float(re.search(r"held-out exact match: greedy ([\d.]+)%", text).group(1))
    beam = float(re.search(r"beam search \(4 beams\) ([\d.]+)%", text).group(1))
    assert greedy > 60.0 and beam > 60.0, text
    assert rc == (0 if greedy > 95.0 else 1)                        # the exit status follows the 95% bar
    assert "trained 120 steps" in text and "(1 threads)" in text and "held-out examples (greedy | beam)" in text
    assert len(re.findall(r"^\s+\d+ -> '", text, flags=re.M)) == 6  # six decoded examples
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss = re.search(r"train loss ([\d.]+) -> ([\d.]+)", text)
    assert float(loss.group(2)) < 0.5 * float(loss.group(1))


@pytest.mark.parametrize("argv, msg", [
    (["--steps", "0"], "--steps"),
    (["--seconds", "-1"], "--seconds"),
    (["--digits", "13"], "--digits"),
    (["--device", "nonsense"], "--device"),
    (["--threads", "0"], "--threads"),
])
def test_demo_bad_arguments_exit_2(argv, msg, capsys):
    assert main(["demo", "transformer", *argv]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_demo_cuda_without_cuda_exits_2(capsys):
    assert main(["demo", "transformer", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
