"""deltatune.train.data: reading, validating, tokenizing, padding and bucketing user data; the E2E sample."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from deltatune.models import embedded_path
from deltatune.train.data import (
    Collator,
    DataError,
    Example,
    bucket_batches,
    detect_format,
    e2e_prompt,
    load_dataset,
    load_e2e_sample,
    read_rows,
)

IGNORE = -100


@pytest.fixture(scope="module")
def bert():
    """MiniLM's (BERT) tokenizer: [CLS] ... [SEP], lower-cases, no eos, no chat template."""
    return AutoTokenizer.from_pretrained(str(embedded_path("minilm-l6")))


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct's tokenizer: eos <|im_end|>, a ChatML chat template (takes seconds)."""
    gguf = embedded_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labelled(tok, example: Example) -> str:
    return tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE])


# -- reading and validation -----------------------------------------------------------------------

def test_read_rows_jsonl_csv_tsv(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": "two\\u2028still two"}\n')
    assert read_rows(j) == [{"text": "one"}, {"text": "two\u2028still two"}]
    c = tmp_path / "a.csv"
    c.write_text('prompt,completion\n"Hello, you","multi\nline"\nx,y\n')
    assert read_rows(c) == [{"prompt": "Hello, you", "completion": "multi\nline"}, {"prompt": "x", "completion": "y"}]
    t = tmp_path / "a.tsv"
    t.write_text("text\tlabel\ngood, fine\t1\nbad\t0\n")
    assert read_rows(t) == [{"text": "good, fine", "label": "1"}, {"text": "bad", "label": "0"}]


def test_malformed_json_names_file_and_line(tmp_path):
    f = jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", '{"text": "unclosed'])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON"):
        read_rows(f)
    f = jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl, line 2: expected a JSON object"):
        read_rows(f)


def test_csv_wrong_field_count_names_the_file_line(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text('text,label\n"spans\ntwo lines",1\nno label here\n')  # the bad row is on file line 4
    with pytest.raises(DataError, match=r"bad\.csv, line 4: expected 2 fields"):
        read_rows(f)
    f.write_text('text,label\n"a\nb",1\n"bad row\nover lines 4-5",1,2\n')  # the line where the row starts
    with pytest.raises(DataError, match=r"bad\.csv, line 4: expected 2 fields \(text, label\), got 3"):
        read_rows(f)


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "", "file is empty"),
    ("blank.jsonl", "\n  \n", "file is empty"),
    ("header.csv", "text,label\n", "file has no rows"),
])
def test_empty_file_is_an_error_naming_it(tmp_path, bert, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=rf"{name}: {message}"):
        load_dataset(f, bert)


def test_detect_format():
    assert detect_format([{"text": "a"}]) == "text"
    assert detect_format([{"text": "a", "label": 1}]) == "classification"
    assert detect_format([{"prompt": "a", "completion": "b"}]) == "prompt_completion"
    assert detect_format([{"messages": []}]) == "messages"
    with pytest.raises(DataError, match="cannot tell the data format"):
        detect_format([{"sentence": "a", "label": 1}])


def test_missing_column_named_with_file_before_tokenizing(tmp_path, bert):
    f = jsonl(tmp_path / "pc.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"pc\.jsonl: format 'prompt_completion' needs a column 'completion'"):
        load_dataset(f, bert, format="prompt_completion")
    g = tmp_path / "cls.tsv"
    g.write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=r"cls\.tsv: format 'classification' needs a column 'text'"):
        load_dataset(g, bert, format="classification")
    with pytest.raises(DataError, match=r"cls\.tsv: cannot tell the data format"):
        load_dataset(g, bert)


def test_malformed_row_names_file_line_and_field(tmp_path, smol):
    f = jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, "", {"prompt": "c", "completion": 3}])
    with pytest.raises(DataError, match=r"pc\.jsonl, line 3: field 'completion' must be a string, got int"):
        load_dataset(f, smol)
    f = jsonl(tmp_path / "pc2.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match=r"pc2\.jsonl, line 2: missing field 'completion'"):
        load_dataset(f, smol)
    f = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": None}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: field 'messages\[1\]\.content' must be a string"):
        load_dataset(f, smol)
    f = jsonl(tmp_path / "chat2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat2\.jsonl, line 1: field 'messages' has no assistant turn"):
        load_dataset(f, smol)
    f = jsonl(tmp_path / "cls.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": [1]}])
    with pytest.raises(DataError, match=r"cls\.jsonl, line 2: field 'label' must be an integer"):
        load_dataset(f, smol)


# -- the four formats, tokenized ------------------------------------------------------------------

def test_text_format_and_truncation(tmp_path, bert):
    long = " ".join(["word"] * 40)
    f = jsonl(tmp_path / "lm.jsonl", [{"text": "The cat sat."}, {"text": long}])
    ds = load_dataset(f, bert, max_length=16)
    assert ds.format == "text" and len(ds) == 2
    short, cut = ds[0], ds[1]
    assert short.input_ids[0] == bert.cls_token_id
    assert bert.decode(short.input_ids, skip_special_tokens=True) == "the cat sat."
    assert short.labels == short.input_ids  # loss on every token
    assert len(cut.input_ids) == 16 and ds.lengths == [len(short.input_ids), 16]
    assert ds.stats.rows == 2 and ds.stats.truncated == 1 and ds.stats.dropped == 0
    assert ds.stats.tokens == sum(ds.lengths)


def test_prompt_completion_loss_on_completion_only(tmp_path, smol):
    rows = [{"prompt": "Describe: name: Aromi, food: Thai\n", "completion": "Aromi serves Thai food."},
            {"prompt": "", "completion": "Only a completion."}]
    ds = load_dataset(jsonl(tmp_path / "pc.jsonl", rows), smol)
    assert ds.format == "prompt_completion"
    for row, ex in zip(rows, ds):
        assert labelled(smol, ex) == row["completion"] + smol.eos_token
        n_prompt = len(smol(row["prompt"], add_special_tokens=False)["input_ids"])
        assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
        assert smol.decode(ex.input_ids) == row["prompt"] + row["completion"] + smol.eos_token
    assert ds.stats.label_tokens == sum(sum(lab != IGNORE for lab in e.labels[1:]) for e in ds)


def test_prompt_completion_truncation_counted_and_rows_without_loss_dropped(tmp_path, smol, caplog):
    rows = [{"prompt": "Hi\n", "completion": "Hello."},
            {"prompt": "Hi\n", "completion": " ".join(["more"] * 50)},  # cut inside the completion
            {"prompt": " ".join(["long"] * 50), "completion": "lost"}]  # cut inside the prompt
    with caplog.at_level(logging.WARNING, logger="deltatune.train.data"):
        ds = load_dataset(jsonl(tmp_path / "pc.jsonl", rows), smol, max_length=20)
    assert len(ds) == 2 and ds.stats.rows == 3
    assert ds.stats.truncated == 2 and ds.stats.dropped == 1
    assert len(ds[1].input_ids) == 20 and ds[1].labels[-1] != IGNORE
    assert "2 of 3 rows" in caplog.text and "1 dropped" in caplog.text
    with pytest.raises(DataError, match=r"pc2\.jsonl: no example keeps a labelled token"):
        load_dataset(jsonl(tmp_path / "pc2.jsonl", rows[2:]), smol, max_length=20)


def test_messages_loss_on_assistant_turns_only(tmp_path, smol):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "Fine, you?"},
            {"role": "assistant", "content": "Good."}]
    ds = load_dataset(jsonl(tmp_path / "chat.jsonl", [{"messages": chat}]), smol)
    assert ds.format == "messages"
    ex = ds[0]
    assert smol.decode(ex.input_ids) == smol.apply_chat_template(chat, tokenize=False)
    runs, run = [], []  # contiguous labelled spans, one per assistant turn
    for t, lab in zip(ex.input_ids + [0], ex.labels + [IGNORE]):
        if lab != IGNORE:
            assert lab == t
            run.append(t)
        elif run:
            runs.append(smol.decode(run))
            run = []
    assert runs == ["Hello! How are you?<|im_end|>", "Good.<|im_end|>"]


def test_messages_in_csv_cells_and_truncation(tmp_path, smol):
    chat = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": " ".join("1234567890")}]
    f = tmp_path / "chat.csv"
    f.write_text('messages\n"' + json.dumps(chat).replace('"', '""') + '"\n')
    full = load_dataset(f, smol)[0]
    cut = load_dataset(f, smol, max_length=len(full.input_ids) - 3)
    assert cut.stats.truncated == 1
    assert cut[0].input_ids == full.input_ids[:-3] and cut[0].labels == full.labels[:-3]


def test_messages_need_a_chat_template(tmp_path, bert):
    f = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl: format 'messages' needs a tokenizer with a chat template"):
        load_dataset(f, bert)


def test_classification_string_labels_sorted_and_named(tmp_path, bert):
    rows = [{"text": "I loved it", "label": "pos"}, {"text": "meh", "label": "neutral"},
            {"text": "awful", "label": "neg"}]
    f = jsonl(tmp_path / "cls.jsonl", rows)
    ds = load_dataset(f, bert)
    assert ds.format == "classification"
    assert ds.label_names == ["neg", "neutral", "pos"] and ds.num_labels == 3
    assert [e.label for e in ds] == [2, 1, 0]
    assert ds[0].input_ids[0] == bert.cls_token_id and ds[0].input_ids[-1] == bert.sep_token_id
    named = load_dataset(f, bert, label_names=["pos", "neg", "neutral"])
    assert [e.label for e in named] == [0, 2, 1] and named.label2id == {"pos": 0, "neg": 1, "neutral": 2}
    with pytest.raises(DataError, match=r"cls\.jsonl, line 2: field 'label' 'neutral' is not one of"):
        load_dataset(f, bert, label_names=["pos", "neg"])


def test_classification_int_labels_from_tsv_and_truncation(tmp_path, bert):
    f = tmp_path / "sst.tsv"
    f.write_text("text\tlabel\ngood film\t1\n" + "bad " * 30 + "\t0\nfine\t3\n")
    ds = load_dataset(f, bert, format="classification", max_length=12)
    assert [e.label for e in ds] == [1, 0, 3] and ds.num_labels == 4
    assert ds.stats.truncated == 1
    assert len(ds[1].input_ids) == 12 and ds[1].input_ids[-1] == bert.sep_token_id
    batch = Collator(bert)(list(ds))
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0, 3]
    assert batch["input_ids"].shape == (3, 12)


# -- batching -------------------------------------------------------------------------------------

def test_collator_pads_dynamically(smol):
    pad = smol.pad_token_id
    batch = Collator(smol)([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert Collator(smol)([Example([1, 2], [1, 2])])["input_ids"].shape == (1, 2)  # longest in the batch


def test_bucket_batches_deterministic_complete_and_bucketed():
    import random

    rng = random.Random(1)
    lengths = [rng.randint(1, 500) for _ in range(1003)]
    a = bucket_batches(lengths, 8, seed=3)
    assert a == bucket_batches(lengths, 8, seed=3)
    assert a != bucket_batches(lengths, 8, seed=4)
    flat = [i for b in a for i in b]
    assert sorted(flat) == list(range(1003))
    assert sorted(len(b) for b in a) == [3] + [8] * 125  # chunks of 400, 400, 203
    # within a batch lengths are close: far closer than in a random batch of 8
    firsts = [min(lengths[i] for i in b) for b in a[:50]]
    assert firsts != sorted(firsts)  # batch order shuffled, not ascending through each chunk
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 50
    ordered = bucket_batches(lengths, 8, shuffle=False)
    assert ordered == bucket_batches(lengths, 8, seed=99, shuffle=False)
    assert [lengths[i] for i in ordered[0]] == sorted(lengths[:400])[:8]
    with pytest.raises(ValueError):
        bucket_batches(lengths, 0)


# -- the packaged E2E sample ----------------------------------------------------------------------

def test_e2e_sample_split_by_mr():
    train, evl = load_e2e_sample("train"), load_e2e_sample("eval")
    assert len(evl) == 60 and len(train) == 487
    assert not {r["mr"] for r in train} & {r["mr"] for r in evl}
    assert sum(len(r["references"]) for r in train + evl) == 4672
    assert all(r["references"] and all(isinstance(s, str) and s for s in r["references"]) for r in train + evl)
    with pytest.raises(ValueError):
        load_e2e_sample("test")


def test_e2e_prompt():
    p = e2e_prompt("name : Aromi | eatType : coffee shop | area : city centre")
    assert p == "Describe this restaurant in one sentence.\nname: Aromi, eatType: coffee shop, area: city centre"
    assert e2e_prompt("name[Aromi], priceRange[less than £20]").endswith("name: Aromi, priceRange: less than £20")


def test_tsv_quotes_are_text_not_quoting(tmp_path):
    """A TSV row whose text holds quote characters is one row, with the quotes kept (no CSV quoting)."""
    from deltatune.train.data import _read

    f = tmp_path / "q.tsv"
    f.write_text('text\tlabel\n"play it\tyes\n"hi" there\tno\nplain\tyes\n')
    rows = [r for _, r in _read(f)]
    assert [r["text"] for r in rows] == ['"play it', '"hi" there', "plain"]
