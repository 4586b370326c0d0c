"""Adapter files: only safe formats load by default, bad files fail loudly and change nothing, saves are atomic,
and files written by this release keep loading (a stored fixture)."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
import deltatune.io.adapter as adapter_io

FIXTURES = Path(__file__).parent / "fixtures"
ATTN = ["q_proj", "v_proj"]


def tiny_llama(hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def out(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def save_lora(folder: Path, model: nn.Module | None = None, **kw) -> torch.Tensor:
    """Save a random (non-identity) LoRA on ``model`` (default: a fresh tiny Llama); return its logits."""
    model = tiny_llama() if model is None else model
    dm = dt.attach(model, dt.LoRAConfig(r=4, init="random", **{"targets": ATTN, **kw}))
    dm.save(folder)
    return out(dm)


def site_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, dt.Site)]


class Snapshot:
    """Everything a failed load must leave exactly as it was."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.grads = {n: p.requires_grad for n, p in model.named_parameters()}
        self.sites = site_paths(model)
        dm = dt.owner_of(model)
        self.configs = {k: c.model_copy(deep=True) for k, c in dm.configs.items()} if dm else None
        self.active = dm.active if dm else None
        self.out = out(model)

    def assert_unchanged(self) -> None:
        state = self.model.state_dict()
        assert list(state) == list(self.state)
        assert all(torch.equal(state[k], v) for k, v in self.state.items())
        assert {n: p.requires_grad for n, p in self.model.named_parameters()} == self.grads
        assert site_paths(self.model) == self.sites
        dm = dt.owner_of(self.model)
        if self.configs is None:
            assert dm is None and not self.sites
        else:
            assert dm.configs == self.configs and dm.active == self.active
            assert all(set(s.deltas) <= set(self.configs) for _, s in dm.sites())
        assert torch.equal(out(self.model), self.out)


# -- pickle files ----------------------------------------------------------------------------------
def to_pickle(folder: Path) -> None:
    """Replace the safetensors weights by an ``adapter_model.bin`` with the same tensors."""
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), folder / "adapter_model.bin")
    weights.unlink()


def test_pickle_only_adapter_is_refused_unless_allowed(tmp_path):
    want = save_lora(tmp_path)
    to_pickle(tmp_path)
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(dt.AdapterFileError, match=r"adapter_model\.bin.*allow_pickle=True"):
        dt.load_adapter(model, tmp_path)
    snap.assert_unchanged()
    dm = dt.load_adapter(model, tmp_path, allow_pickle=True)
    assert torch.equal(out(dm), want)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_that_runs_code_is_never_executed(tmp_path, allow_pickle):
    """Refused outright by default; with allow_pickle the loader still unpickles tensors only."""
    folder = tmp_path / "adapter"
    save_lora(folder)
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.x": _Payload(marker)}, f, protocol=2)
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(dt.AdapterFileError, match=r"adapter_model\.bin"):
        dt.load_adapter(model, folder, allow_pickle=allow_pickle)
    assert not marker.exists()
    snap.assert_unchanged()


# -- bad folders: every failure names what is wrong and leaves the model as it was -----------------
def _edit_config(folder: Path, edit) -> None:
    file = folder / "adapter_config.json"
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _edit_weights(folder: Path, edit) -> None:
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _truncate(folder: Path) -> None:
    file = folder / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _set(section: str, key: str, value):
    def edit(d):
        (d if section == "peft" else d["deltatune"]["config"])[key] = value
    return edit


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"

# case -> (build the bad folder, model kwargs, exception, substrings the message must contain)
BAD = {
    "pickle-only": (to_pickle, {}, dt.AdapterFileError, ["adapter_model.bin", "allow_pickle"]),
    "truncated-weights": (_truncate, {}, dt.AdapterFileError, ["adapter_model.safetensors"]),
    "garbage-weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(os.urandom(300)), {},
                        dt.AdapterFileError, ["adapter_model.safetensors"]),
    "empty-weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), {},
                      dt.AdapterFileError, ["adapter_model.safetensors"]),
    "no-weights": (lambda f: (f / "adapter_model.safetensors").unlink(), {},
                   FileNotFoundError, ["adapter_model.safetensors"]),
    "invalid-json": (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA", "r": '), {},
                     dt.AdapterFileError, ["adapter_config.json", "JSON"]),
    "no-config": (lambda f: (f / "adapter_config.json").unlink(), {}, FileNotFoundError, ["adapter_config.json"]),
    "unknown-method": (lambda f: _edit_config(f, lambda d: d["deltatune"].update(type="hyperlora")), {},
                       ValueError, ["hyperlora"]),
    "unknown-peft-type": (lambda f: _edit_config(f, lambda d: (d.pop("deltatune"), d.update(peft_type="FUTURE_PEFT"))),
                          {}, dt.AdapterFileError, ["adapter_config.json", "FUTURE_PEFT"]),
    "invalid-value": (lambda f: _edit_config(f, _set("deltatune", "r", -3)), {},
                      dt.AdapterFileError, ["adapter_config.json", "greater than 0"]),
    "hidden-32-into-48": (lambda f: None, dict(hidden=48), dt.AdapterFileError,
                          ["model.layers.0.self_attn.q_proj", "(4, 32)", "(4, 48)"]),
    "layer-the-model-lacks": (lambda f: None, dict(layers=1), dt.AdapterFileError, ["model.layers.1.self_attn.q_proj"]),
    "regex-target-the-model-lacks": (lambda f: _edit_config(f, _set("deltatune", "targets", r"model\.layers\.1\.mlp\.gate_proj")),
                                     dict(layers=1), dt.AdapterFileError, ["gate_proj", "selected no module"]),
    # a saved module the model lacks is ignored like PEFT ignores it, unless the file holds weights for it
    "saved-module-the-model-lacks": (lambda f: (_edit_config(f, _set("deltatune", "modules_to_save", ["classifier"])),
                                                _edit_weights(f, lambda t: t.update(
                                                    {"base_model.model.classifier.weight": torch.zeros(2, 32)}))),
                                     {}, dt.AdapterFileError, ["classifier.weight"]),
    "extra-key": (lambda f: _edit_weights(f, lambda t: t.update({f"{Q0}.lora_C.weight": torch.zeros(4, 4)})), {},
                  dt.AdapterFileError, ["lora_C.weight"]),
    "extra-module": (lambda f: _edit_weights(f, lambda t: t.update(
        {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)})), {},
        dt.AdapterFileError, ["model.layers.0.mlp.up_proj"]),
    "config-is-a-list": (lambda f: (f / "adapter_config.json").write_text("[]"), {}, dt.AdapterFileError,
                         ["adapter_config.json", "JSON object, not a list"]),
    "config-nested-too-deeply": (lambda f: (f / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000),
                                 {}, dt.AdapterFileError, ["adapter_config.json", "nested too deeply"]),
    "our-config-is-a-list": (lambda f: _edit_config(f, lambda d: d["deltatune"].update(config=[])), {},
                             dt.AdapterFileError, ["adapter_config.json", "deltatune.config", "not a list"]),
    "peft-field-of-the-wrong-kind": (lambda f: _edit_config(f, lambda d: (d.pop("deltatune"), d.update(r="four"))),
                                     {}, dt.AdapterFileError, ["adapter_config.json"]),
    "nan-weight": (lambda f: _edit_weights(f, lambda t: t[f"{Q0}.lora_A.weight"].view(-1).__setitem__(3, float("nan"))),
                   {}, dt.AdapterFileError, ["adapter_model.safetensors", f"{Q0}.lora_A.weight", "NaN or inf"]),
    "inf-weight": (lambda f: _edit_weights(f, lambda t: t[f"{Q0}.lora_B.weight"].view(-1).__setitem__(0, float("inf"))),
                   {}, dt.AdapterFileError, ["adapter_model.safetensors", f"{Q0}.lora_B.weight", "NaN or inf"]),
    "huge-r": (lambda f: _edit_config(f, _set("deltatune", "r", 10**9)), {}, dt.AdapterFileError,
               ["adapter_config.json", "MiB of parameters", "do not describe these weights"]),
    "huge-r-peft": (lambda f: _edit_config(f, lambda d: (d.pop("deltatune"), d.update(r=10**9))), {},
                    dt.AdapterFileError, ["adapter_config.json", "MiB of parameters"]),
    "tensor-of-another-shape": (lambda f: _edit_weights(f, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(3, 32)})),
                                {}, dt.AdapterFileError, ["adapter_model.safetensors", "q_proj.lora_A.weight",
                                                          "has shape (3, 32)", "(4, 32)"]),
    "missing-key": (lambda f: _edit_weights(f, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")),
                    {}, dt.AdapterFileError, ["model.layers.1.self_attn.v_proj", "lora_B.weight"]),
}


@pytest.mark.parametrize("existing", [False, True], ids=["bare-model", "model-with-adapter"])
@pytest.mark.parametrize("case", list(BAD))
def test_failed_load_names_the_problem_and_changes_nothing(case, existing, tmp_path):
    make_bad, model_kw, exc, needles = BAD[case]
    folder = tmp_path / "adapter"
    save_lora(folder)
    make_bad(folder)
    model = tiny_llama(**model_kw)
    if existing:  # shares the q_proj site with the adapter that fails to load
        dm = dt.attach(model, dt.LoRAConfig(r=2, init="random", targets=["q_proj", "o_proj"]), name="first")
        dm.add(dt.LoRAConfig(r=2, init="random", targets=["k_proj"]), name="second")
        dm.activate(["first", "second"])
    snap = Snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed load must fail, not warn and half-succeed
        with pytest.raises(exc) as info:
            dt.load_adapter(model, folder, name="new")
    message = str(info.value.args[0]) if info.value.args else str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    snap.assert_unchanged()


@pytest.mark.parametrize("method,field", [("lora", "r"), ("dora", "r"), ("adalora", "init_r"), ("loha", "r"),
                                          ("dylora", "r"), ("adapter_houlsby", "bottleneck_size"), ("vera", "r"),
                                          ("prompt_tuning", "num_virtual_tokens"), ("prefix_tuning", "num_virtual_tokens")])
def test_huge_sizes_are_refused_from_the_header_before_reading(method, field, tmp_path, monkeypatch):
    """Every method's config is measured against the file before a byte of tensor data is read or allocated."""
    model = tiny_llama()
    dt.attach(model, dt.config(method)).save(tmp_path)
    _edit_config(tmp_path, _set("deltatune", field, 10**7))
    fresh = tiny_llama()
    snap = Snapshot(fresh)

    def no_reading(*a, **k):
        raise AssertionError("tensor data read before the config's sizes were checked")

    monkeypatch.setattr(dt.io.adapter, "load_file", no_reading)
    with pytest.raises(dt.AdapterFileError, match="MiB of parameters"):
        dt.load_adapter(fresh, tmp_path, name="new")
    snap.assert_unchanged()


def test_missing_folder_is_file_not_found(tmp_path):
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dt.load_adapter(model, tmp_path / "nowhere")
    assert dt.owner_of(model) is None


def test_unknown_method_error_is_an_adapter_file_error_naming_the_file(tmp_path):
    save_lora(tmp_path)
    _edit_config(tmp_path, lambda d: d["deltatune"].update(type="hyperlora"))
    with pytest.raises(dt.AdapterFileError, match=r"adapter_config\.json.*hyperlora"):
        dt.load_adapter(tiny_llama(), tmp_path)


# -- atomic saves ----------------------------------------------------------------------------------
def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _half_then_fail(real):
    """``Path.write_bytes`` on a disk that fills up halfway through the file."""
    def write(self, data):
        real(self, data[: len(data) // 2])
        raise OSError("No space left on device")
    return write


def _second_adapter() -> dt.DeltaModel:
    return dt.attach(tiny_llama(seed=5), dt.LoRAConfig(r=2, init="random", targets=["k_proj", "o_proj"]))


def test_failed_weight_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    want = save_lora(tmp_path)
    before = _listing(tmp_path)
    other = _second_adapter()
    monkeypatch.setattr(pathlib.Path, "write_bytes", _half_then_fail(pathlib.Path.write_bytes))
    with pytest.raises(OSError, match="No space left"):
        other.save(tmp_path)
    assert _listing(tmp_path) == before  # same names (no temp file left) and same bytes
    monkeypatch.undo()
    assert torch.equal(out(dt.load_adapter(tiny_llama(), tmp_path)), want)


def test_failed_subfolder_write_leaves_no_half_adapter(tmp_path, monkeypatch):
    dm = _second_adapter()
    dm.add(dt.LoRAConfig(r=2, init="random", targets=["q_proj"]), "named")
    monkeypatch.setattr(pathlib.Path, "write_bytes", _half_then_fail(pathlib.Path.write_bytes))
    with pytest.raises(OSError):
        dm.save(tmp_path, names=["named"])
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_failed_config_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    want = save_lora(tmp_path)
    before = _listing(tmp_path)
    other = _second_adapter()
    real = pathlib.Path.write_text

    def half_then_fail(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        other.save(tmp_path)
    monkeypatch.undo()
    assert _listing(tmp_path) == before
    assert torch.equal(out(dt.load_adapter(tiny_llama(), tmp_path)), want)


def test_a_crash_between_the_two_renames_is_refused_at_load_not_served(tmp_path, monkeypatch):
    """Saving over an adapter replaces two files; dying between the renames leaves new weights with the old config
    (here the old alpha: outputs silently wrong). The two carry a save id each, so loading refuses the pair."""
    save_lora(tmp_path)
    other = dt.attach(tiny_llama(), dt.LoRAConfig(r=4, alpha=64, init="random", targets=ATTN))
    real, renames = os.replace, []

    def die_after_the_first(src, dst):
        if renames:
            raise KeyboardInterrupt("killed")
        renames.append(dst)
        real(src, dst)

    monkeypatch.setattr(adapter_io.os, "replace", die_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        other.save(tmp_path)
    monkeypatch.undo()
    assert [Path(p).name for p in renames] == ["adapter_model.safetensors"]  # the torn state
    with pytest.raises(dt.AdapterFileError, match="two different saves") as err:
        dt.load_adapter(tiny_llama(), tmp_path)
    assert "adapter_model.safetensors" in str(err.value) and "adapter_config.json" in str(err.value)
    other.save(tmp_path)  # saved again: whole
    assert torch.equal(out(dt.load_adapter(tiny_llama(), tmp_path)), out(other))


def test_a_new_adapter_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    dm = dt.attach(tiny_llama(), dt.LoRAConfig(r=4, init="random", targets=ATTN))
    monkeypatch.setattr(pathlib.Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        dm.save(tmp_path / "new")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin
    dm.save(tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(out(dt.load_adapter(tiny_llama(), tmp_path / "new")), out(dm))


def test_weights_rewritten_by_another_tool_still_load(tmp_path):
    """A file without deltatune's save id (PEFT, a script with safetensors) is not questioned."""
    save_lora(tmp_path)
    _edit_weights(tmp_path, lambda t: t.update({k: v * 2 for k, v in t.items()}))
    dt.load_adapter(tiny_llama(), tmp_path)


def test_saving_over_an_adapter_replaces_it(tmp_path):
    save_lora(tmp_path)
    other = _second_adapter()
    want = out(other)
    other.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(out(dt.load_adapter(tiny_llama(seed=5), tmp_path)), want)


# -- files from newer releases ---------------------------------------------------------------------
def test_unknown_future_config_keys_load_with_a_warning(tmp_path):
    want = save_lora(tmp_path)
    _edit_config(tmp_path, _set("deltatune", "future_knob", 3))
    _edit_config(tmp_path, _set("peft", "some_new_peft_field", [1, 2]))
    with pytest.warns(UserWarning, match="future_knob"):
        dm = dt.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(out(dm), want)


def test_peft_only_config_ignores_unknown_peft_fields(tmp_path):
    """Without a deltatune section the PEFT fields are read; fields PEFT added later do not break it."""
    want = save_lora(tmp_path)
    _edit_config(tmp_path, lambda d: (d.pop("deltatune"), d.update(some_new_peft_field=True)))
    assert torch.allclose(out(dt.load_adapter(tiny_llama(), tmp_path)), want, atol=1e-6)


# -- backward compatibility: a stored adapter written by release 0.1.0 -----------------------------
LORA_V1 = FIXTURES / "lora_v1"


class FixtureNet(nn.Module):
    """A tiny deterministic model (no RNG, no transformers): vocab 16, width 8, two blocks, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(q=nn.Linear(8, 8), v=nn.Linear(8, 8, bias=False),
                                                       up=nn.Linear(8, 12), down=nn.Linear(12, 8)))
                                    for _ in range(2))
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            for i, (_, p) in enumerate(sorted(self.named_parameters())):
                p.copy_(0.3 * torch.sin(0.7 * torch.arange(p.numel(), dtype=torch.float64) + i).reshape(p.shape))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.layers:
            h = h + b["v"](torch.tanh(b["q"](h)))
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.head(h)


FIXTURE_IDS = torch.tensor([[1, 5, 9, 15, 0, 3], [2, 2, 7, 11, 14, 6]])


def regenerate_lora_v1(folder: Path = LORA_V1) -> None:
    """Write the fixture: ``default`` (LoRA, embedding, patterns, a saved head) and ``dora`` (DoRA + rsLoRA)."""
    torch.manual_seed(0)
    model = FixtureNet().eval()
    expected = {"input_ids": FIXTURE_IDS, "base": model(FIXTURE_IDS).detach()}
    dm = dt.attach(model, dt.LoRAConfig(r=2, alpha=4.0, init="random", targets=["embed", "q", "v", "up"],
                                        rank_pattern={"up": 3}, alpha_pattern={r"layers\.1\.v": 8.0},
                                        modules_to_save=["head"]))
    dm.add(dt.LoRAConfig(r=2, init="random", targets=["q", "down"], use_dora=True, use_rslora=True), "dora")
    with torch.no_grad():
        for name in dm.configs:
            for d in dm.deltas(name).values():
                for p in d.parameters():
                    p.mul_(1 + 0.5 * torch.randn_like(p))
    for name in dm.configs:
        dm.activate(name)
        expected[name] = dm(FIXTURE_IDS).detach()
    dm.save(folder)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(folder / "expected.safetensors"))


@pytest.fixture(scope="module")
def lora_v1() -> Path:
    if os.environ.get("DELTATUNE_REGEN_FIXTURES") == "1":
        regenerate_lora_v1()
    return LORA_V1


def test_lora_v1_fixture_is_small_and_in_the_peft_format(lora_v1):
    files = [p for p in lora_v1.rglob("*") if p.is_file()]
    assert sorted(str(p.relative_to(lora_v1)) for p in files) == [
        "adapter_config.json", "adapter_model.safetensors", "dora/adapter_config.json",
        "dora/adapter_model.safetensors", "expected.safetensors"]
    assert sum(p.stat().st_size for p in files) < 16_000
    cfg = json.loads((lora_v1 / "dora" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["use_dora"], cfg["deltatune"]["format"]) == ("LORA", True, 1)


def test_lora_v1_fixture_loads_with_the_stored_outputs(lora_v1):
    expected = load_file(str(lora_v1 / "expected.safetensors"))
    model = FixtureNet().eval()
    assert torch.equal(expected["input_ids"], FIXTURE_IDS)
    torch.testing.assert_close(model(FIXTURE_IDS), expected["base"], atol=1e-6, rtol=0)  # the base is the same
    dm = dt.load_adapter(model, lora_v1)
    dm.load(lora_v1 / "dora", "dora")
    for name in ("default", "dora"):
        dm.activate(name)
        with torch.no_grad():
            got = dm(FIXTURE_IDS)
        assert (got - expected["base"]).abs().max() > 1e-2
        torch.testing.assert_close(got, expected[name], atol=1e-6, rtol=0)
    with dm.disabled():
        torch.testing.assert_close(dm(FIXTURE_IDS), expected["base"], atol=1e-6, rtol=0)


def test_lora_v1_fixture_round_trips_byte_for_byte(lora_v1, tmp_path):
    """Loading and re-saving changes no tensor: the format this release writes is the one it reads."""
    model = FixtureNet().eval()
    dm = dt.load_adapter(model, lora_v1)
    dm.save(tmp_path)
    old, new = load_file(str(lora_v1 / "adapter_model.safetensors")), load_file(str(tmp_path / "adapter_model.safetensors"))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    strip = lambda d: {k: v for k, v in d.items() if k != "deltatune"}  # noqa: E731
    assert strip(json.loads((tmp_path / "adapter_config.json").read_text())) == \
        strip(json.loads((lora_v1 / "adapter_config.json").read_text()))


if __name__ == "__main__":  # DELTATUNE_REGEN_FIXTURES=1 python tests/test_adapter_files.py
    if os.environ.get("DELTATUNE_REGEN_FIXTURES") == "1":
        regenerate_lora_v1()
        print(f"wrote {LORA_V1}")
