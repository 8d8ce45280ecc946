"""`pyattn demo gru`: the lecture's character GRU learns to continue its texts (the demo's own exit status)."""
from pyattn.cli import main
from pyattn.models.char_gru import train_on_text


def test_help_is_learned():
    res = train_on_text("help", prompt_len=1, steps=60)
    assert res.continuation == "elp", res
    assert res.final_loss < 0.05


def test_demo_cli_succeeds(capsys):
    assert main(["demo", "gru"]) == 0
    out = capsys.readouterr().out
    assert "'h' -> 'elp' (correct)" in out and "WRONG" not in out
