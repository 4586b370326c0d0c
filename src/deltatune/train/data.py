"""Reading user data files for training: JSONL, CSV and TSV, tokenized, padded and bucketed.

Four shapes, detected from the columns or named with ``format=``:

* ``text``: language modelling on the whole text (``{"text": ...}``);
* ``prompt_completion``: loss on the completion only (``{"prompt": ..., "completion": ...}``);
* ``messages``: chat, rendered with the tokenizer's chat template, loss on assistant turns only
  (``{"messages": [{"role": "user", "content": ...}, ...]}``);
* ``classification``: sequence classification (``{"text": ..., "label": ...}``), labels ints or strings.

Every problem is a :class:`DataError` naming the file, and the line and field where there is one, and is
raised while loading, before any training starts. Sequences longer than ``max_length`` are cut on the
right; how many were cut (and dropped, where nothing with a loss was left) is counted in ``stats``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMATS = ("text", "prompt_completion", "messages", "classification")
COLUMNS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",),
           "classification": ("text", "label")}
JSONL_SUFFIXES = {".jsonl", ".jsonlines", ".json-lines", ".ndjson", ".json"}
IGNORE = -100


class DataError(ValueError):
    """A data file that cannot be used: names the file, and the line and field where there is one."""


# -- reading ----------------------------------------------------------------------------------------

def _read(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based file line, row) pairs; the line is where the row starts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES | {".csv", ".tsv"}:
        raise DataError(f"{path}: unknown file type {suffix!r} (expected .jsonl, .csv or .tsv)")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix in JSONL_SUFFIXES:
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: malformed JSON ({e.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    else:
        # TSV has no quoting (IANA text/tab-separated-values; GLUE's files): a quote is text, so a query like
        # 'what does "ok" mean' stays one row; CSV keeps the usual "..." quoting
        reader = (csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
                  if suffix == ".tsv" else csv.reader(io.StringIO(text, newline="")))
        header: list[str] | None = None
        start = 1
        for record in reader:
            line, start = start, reader.line_num + 1
            if not record or record == [""]:
                continue
            if header is None:
                header = [h.strip() for h in record]
            elif len(record) != len(header):
                raise DataError(f"{path}, line {line}: expected {len(header)} fields ({', '.join(header)}), "
                                f"got {len(record)}")
            else:
                rows.append((line, dict(zip(header, record))))
    if not rows:
        raise DataError(f"{path}: file has no rows")
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a .jsonl, .csv or .tsv file (CSV/TSV need a header line); raises DataError."""
    return [row for _, row in _read(path)]


def detect_format(rows: Sequence[dict[str, Any]]) -> str:
    """The data shape of ``rows`` from their columns: one of :data:`FORMATS`."""
    cols = set().union(*(r.keys() for r in rows)) if rows else set()
    for fmt in ("messages", "prompt_completion", "classification", "text"):
        if all(c in cols for c in COLUMNS[fmt]):
            return fmt
    raise DataError(f"cannot tell the data format from columns {sorted(cols)}: expected 'text', "
                    "'prompt' + 'completion', 'messages', or 'text' + 'label'")


def _string(row: dict[str, Any], key: str, where: str, *, empty_ok: bool = False) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if isinstance(msgs, str):  # CSV/TSV cells hold the list as JSON
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'messages' is not valid JSON") from None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"a {type(m[key]).__name__}"
                raise DataError(f"{where}: field 'messages[{i}].{key}' must be a string, is {got}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: field 'messages' has no assistant turn (nothing to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


# -- tokenized data ---------------------------------------------------------------------------------

@dataclass
class Example:
    """One tokenized row: ``labels`` (-100 where no loss) for causal LM, ``label`` for classification."""

    input_ids: list[int]
    labels: list[int] = field(default_factory=list)
    label: int | None = None


@dataclass
class DataStats:
    """What loading did: rows read, examples kept, rows cut at ``max_length``, rows dropped, tokens."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # cut so far that no labelled token was left
    tokens: int = 0
    label_tokens: int = 0

    def __str__(self) -> str:
        return (f"{self.examples} examples from {self.rows} rows, {self.tokens:,} tokens; "
                f"{self.truncated} truncated, {self.dropped} dropped")


@dataclass
class TokenizedDataset(Sequence):
    """Tokenized examples with their ``lengths`` (for bucketing), ``stats`` and, for classification,
    ``label_names`` (index = class id)."""

    examples: list[Example]
    format: str
    stats: DataStats
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.label_names is None else {n: i for i, n in enumerate(self.label_names)}


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [CLS] / [SEP], or BOS)."""
    bare, full = _encode(tokenizer, "a"), list(tokenizer("a")["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def _chat_labels(tokenizer, msgs: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat, labelled on assistant content and its end-of-turn token only.

    Each assistant turn's characters are the difference between the chat rendered up to it (with
    the generation prompt) and the chat rendered through it, less trailing whitespace.
    """
    def render(m: list[dict[str, str]], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)

    text = render(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            before, through = render(msgs[:i], gen=True), render(msgs[:i + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise DataError(f"{where}: field 'messages[{i}]': the chat template does not render this "
                                "conversation turn by turn, so assistant turns cannot be located")
            spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE
              for t, (s, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _class_ids(values: list[tuple[str, Any]], label_names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Class ids for (where, label) pairs and the label names: ints stay, strings sort (or follow names)."""
    for where, v in values:
        if isinstance(v, bool) or not isinstance(v, int | str) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{where}: field 'label' must be an integer or a non-empty string, got {v!r}")
    as_int = all(isinstance(v, int) or re.fullmatch(r"\s*-?\d+\s*", v) for _, v in values)
    if label_names is not None:
        names = [str(n) for n in label_names]
        index = {n: i for i, n in enumerate(names)}
        ids = []
        for where, v in values:
            i = index.get(str(v).strip(), int(v) if as_int else None)
            if i is None or not 0 <= i < len(names):
                raise DataError(f"{where}: field 'label' {v!r} is not one of the label names {names}")
            ids.append(i)
        return ids, names
    if as_int:
        ids = [int(v) for _, v in values]
        for (where, v), i in zip(values, ids):
            if i < 0:
                raise DataError(f"{where}: field 'label' {v!r} is negative")
        return ids, [str(i) for i in range(max(ids) + 1)]
    names = sorted({str(v).strip() for _, v in values})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v).strip()] for _, v in values], names


def load_dataset(path: str | Path, tokenizer, format: str | None = None, max_length: int = 512,
                 label_names: Sequence[str] | None = None) -> TokenizedDataset:
    """Read, validate and tokenize a data file; ``format`` is detected when not given.

    For classification, pass the training set's ``label_names`` when loading its eval set so that
    string labels map to the same ids.
    """
    path = Path(path)
    rows = _read(path)
    cols = set().union(*(r.keys() for _, r in rows))
    if format is None:
        try:
            format = detect_format([r for _, r in rows])
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    for col in COLUMNS[format]:
        if col not in cols:
            raise DataError(f"{path}: format {format!r} needs a column {col!r}; found {', '.join(sorted(cols))}")
    if format == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: format 'messages' needs a tokenizer with a chat template, and this one has none")
    prefix, suffix = _special_tokens(tokenizer)
    if max_length < len(prefix) + len(suffix) + 2:
        raise ValueError(f"max_length={max_length} is too small")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stats = DataStats(rows=len(rows))
    wheres = [f"{path}, line {n}" for n, _ in rows]

    names = None
    if format == "classification":
        texts = [_string(r, "text", w) for (_, r), w in zip(rows, wheres)]
        for (_, r), w in zip(rows, wheres):
            if "label" not in r:
                raise DataError(f"{w}: missing field 'label'")
        class_ids, names = _class_ids([(w, r["label"]) for (_, r), w in zip(rows, wheres)], label_names)
        examples = []
        for text, cls in zip(texts, class_ids):
            body = _encode(tokenizer, text)
            room = max_length - len(prefix) - len(suffix)
            stats.truncated += len(body) > room
            examples.append(Example(prefix + body[:room] + suffix, label=cls))
    else:
        examples = []
        for (_, r), w in zip(rows, wheres):
            if format == "text":
                ids = prefix + _encode(tokenizer, _string(r, "text", w)) + eos
                labels = list(ids)
            elif format == "prompt_completion":
                head = prefix + _encode(tokenizer, _string(r, "prompt", w, empty_ok=True))
                tail = _encode(tokenizer, _string(r, "completion", w)) + eos
                ids, labels = head + tail, [IGNORE] * len(head) + tail
            else:
                ids, labels = _chat_labels(tokenizer, _messages(r, w), w)
            if len(ids) > max_length:
                stats.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE for t in labels[1:]):  # position 0 is never a target
                stats.dropped += 1
                continue
            stats.label_tokens += sum(t != IGNORE for t in labels[1:])
            examples.append(Example(ids, labels))
    if not examples:
        raise DataError(f"{path}: no example keeps a labelled token within max_length={max_length}")
    stats.examples = len(examples)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    if stats.truncated or stats.dropped:
        log.warning("%s: %d of %d rows longer than max_length=%d were truncated (%d dropped: no labelled "
                    "token left)", path, stats.truncated, stats.rows, max_length, stats.dropped)
    return TokenizedDataset(examples, format, stats, names)


# -- batching ---------------------------------------------------------------------------------------

class Collator:
    """Pads a list of examples to the longest (labels with -100) and returns torch tensors."""

    def __init__(self, tokenizer):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, :len(e.input_ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if all(e.label is not None for e in examples):
            batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        else:
            labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
            for i, e in enumerate(examples):
                labels[i, :len(e.labels)] = torch.tensor(e.labels)
            batch["labels"] = labels
        return batch


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Batches of indices of similar length: every index exactly once, deterministic for a seed.

    Indices are shuffled (seeded), sorted by length within chunks of ``50 * batch_size``, cut into
    batches, and the batches shuffled. With ``shuffle=False`` only the sorting within chunks is done.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    chunk = 50 * batch_size
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: lengths[i])
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


# -- the packaged E2E sample ------------------------------------------------------------------------

def e2e_prompt(mr: str) -> str:
    """An instruction for an E2E meaning representation (``name : X | area : Y`` or ``name[X], area[Y]``)."""
    pairs = re.findall(r"([^,\[\]]+)\[([^\]]*)\]", mr) if "[" in mr else \
        [tuple(p.split(":", 1)) for p in mr.split("|") if ":" in p]
    fields = ", ".join(f"{k.strip()}: {v.strip()}" for k, v in pairs)
    return "Describe this restaurant in one sentence.\n" + fields


def load_e2e_sample(split: str) -> list[dict[str, Any]]:
    """The E2E NLG sample shipped in the package (CC BY-SA 4.0): rows ``{"mr", "references"}``.

    ``split`` is "train" or "eval"; the two share no meaning representation.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    text = resources.files("deltatune").joinpath("data", "e2e", f"{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
