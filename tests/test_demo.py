"""The demo end to end on the real SmolLM2, cut short (a few steps, a few eval MRs)."""

import json

import pytest
import torch

import deltatune as dt
from deltatune.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_saves_a_loadable_adapter(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, steps=3, progress=False, eval_limit=4)
    assert set(result) == {"bleu_before", "bleu_after", "adapter", "seconds"}
    assert 0 <= result["bleu_before"] <= 100 and 0 <= result["bleu_after"] <= 100
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    model, _ = dt.load_pretrained("smollm2-135m")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        dm = dt.load_adapter(model, out)
        adapted = dm(input_ids=ids).logits
    assert not torch.allclose(base, adapted)  # three steps at lr 1e-3 moved B away from zero
