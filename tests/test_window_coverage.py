"""benchmarks/window_coverage.py: the 'seen whole' length it counts is exactly where the sink baseline equals the
teacher (checked on a tiny model against the original softmax model), and its per-task counting."""
import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import ligerfx
from models import tiny

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("window_coverage", ROOT / "benchmarks" / "window_coverage.py")
wc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wc)


@pytest.mark.parametrize("window,sinks", [(8, 2), (5, 0)])
def test_fit_length_is_where_swa_sinks_equals_the_teacher(window, sinks):
    teacher = tiny("llama").eval()
    model = ligerfx.transform(copy.deepcopy(teacher), config=ligerfx.LigerConfig(variant="swa_sinks", window=window,
                                                                                  sinks=sinks))
    fit = wc.coverage(np.array([1]), window, sinks)["fits_tokens"]
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (2, fit + 1))
    with torch.no_grad():
        ref = teacher(ids).logits
        out = model(ids).logits
    assert (out[:, :fit] - ref[:, :fit]).abs().max().item() <= 1e-5  # every position sees everything
    assert (out[:, fit] - ref[:, fit]).abs().max().item() > 1e-4  # one token more and the window misses one


def test_coverage_counts_longest_choice():
    count = lambda text: len(text.split()) + 1  # whitespace "tokens" + BOS
    docs = [{"goal": "a b", "sol1": "c", "sol2": "d e f g"},  # "Question: a b\nAnswer: d e f g" = 8 words + BOS
            {"goal": " ".join(["w"] * 20), "sol1": "x", "sol2": "y"}]
    lengths = wc.longest_lengths("piqa", docs, count)
    assert list(lengths) == [9, 24]
    c = wc.coverage(lengths, window=5, sinks=4)  # fits: <= 10
    assert c["fits_tokens"] == 10 and c["fits_pct"] == 50.0 and c["n"] == 2
    wino = {"sentence": "A beat B so _ won the game.", "option1": "A", "option2": "Bee cee"}
    assert wc.scored_texts("winogrande", wino) == ["A beat B so A won the game.", "A beat B so Bee cee won the game."]
    with pytest.raises(ValueError, match="no prompt format"):
        wc.scored_texts("mmlu", {})
