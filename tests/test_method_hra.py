"""HRA (methods/hra.py): the equation against a direct product of reflections, and PEFT interop both ways."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import HRAConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

import deltatune as dt
from test_method_kron import close, jitter, out, peft_load, saved_keys
from test_peft_interop import tiny_bert, tiny_llama

ATTN_MLP = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "llama": (tiny_llama, dict(r=4, targets=ATTN_MLP)),
    "llama-gs": (tiny_llama, dict(r=4, apply_GS=True, targets=ATTN_MLP)),
    "llama-odd": (tiny_llama, dict(r=3, targets=ATTN_MLP)),
    "bert": (tiny_bert, dict(r=8, targets=["query", "value", "intermediate.dense", "output.dense"])),
}


def _kind(build) -> str:
    return "bert" if build is tiny_bert else "llama"


def test_the_delta_is_the_base_times_the_product_of_reflections():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    for gs in (False, True):
        dm = dt.attach(torch.nn.Sequential(copy.deepcopy(lin)),
                       dt.config("hra", r=3, apply_GS=gs, init_weights=False, targets=["0"]))
        (u,) = [d.hra_u.detach() for d in dm.deltas("default").values()]
        if gs:
            q, _ = torch.linalg.qr(u)  # Gram-Schmidt in order = QR (signs do not change q q^T)
            h = torch.eye(6) - 2 * q @ q.T
        else:
            h = torch.eye(6)
            for i in range(3):
                v = u[:, i:i + 1] / u[:, i].norm()
                h = h @ (torch.eye(6) - 2 * v @ v.T)
        want = x @ (lin.weight @ h).T + lin.bias
        torch.testing.assert_close(dm(x), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(h @ h.T, torch.eye(6), atol=1e-5, rtol=0)  # orthogonal


def test_even_r_starts_as_the_identity_and_odd_r_warns():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    dm = dt.attach(copy.deepcopy(lin), dt.config("hra", r=4, targets=["0"]))
    torch.testing.assert_close(dm(x), lin(x), atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="odd r=3"):
        dt.attach(copy.deepcopy(lin), dt.config("hra", r=3, targets=["0"]))
    with pytest.raises(ValueError, match="exceed the input width 8"):
        dt.attach(copy.deepcopy(lin), dt.config("hra", r=9, targets=["0"]))


@pytest.mark.parametrize("case", list(CASES))
def test_deltatune_hra_loads_in_peft_with_equal_outputs(case, tmp_path):
    build, kw = CASES[case]
    base = build()
    fresh, base_out = copy.deepcopy(base), out(base, _kind(build))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd r warns
        dm = dt.attach(base, dt.config("hra", init_weights=False, **kw))
    jitter(p for d in dm.deltas("default").values() for p in d.parameters())
    want = out(dm, _kind(build))
    dm.save(tmp_path)
    pm = peft_load(fresh, tmp_path)
    assert {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()} == saved_keys(tmp_path)
    close(out(pm, _kind(build)), want, base_out)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_hra_loads_in_deltatune_with_equal_outputs_merged_too(case, tmp_path):
    build, kw = CASES[case]
    base = build()
    fresh, base_out = copy.deepcopy(base), out(base, _kind(build))
    peft_kw = {("target_modules" if k == "targets" else k): v for k, v in kw.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, HRAConfig(init_weights=False, **peft_kw))
        jitter(p for n, p in pm.named_parameters() if p.requires_grad)
        want = out(pm, _kind(build))
        pm.save_pretrained(str(tmp_path))
        dm = dt.load_adapter(fresh, tmp_path)
    close(out(dm, _kind(build)), want, base_out)
    dm.merge()
    close(out(dm, _kind(build)), want, base_out)
    dm.unmerge()
    close(out(dm, _kind(build)), want, base_out)
