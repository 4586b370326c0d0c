"""One generation request and its row in the running batch: token choice, detokenisation, stop conditions.

A request is the engine's unit of work; it talks back through ``sink`` (called on the engine's worker thread) with
:class:`Event` objects: ``start`` once admitted into a batch (its adapter is loaded and pinned), ``text`` for each
new piece of output, then exactly one ``done`` or ``error``.

Streaming text must never show what a stop sequence will later remove, nor half a UTF-8 character: a row holds
back the end of its text that begins some stop string, and a trailing U+FFFD, until more tokens decide them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Event:
    kind: str  # "start" | "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0  # for errors: the HTTP status
    code: str = ""  # for errors: a short machine-readable code


@dataclass(eq=False)
class GenRequest:
    """What to generate: prompt token ids, the adapter (None = the base), and when to stop.

    ``temperature`` 0 is greedy; otherwise sampling at that temperature with nucleus ``top_p`` (seeded with
    ``seed`` when given). ``stop`` strings end the output (not included in it). Set ``cancelled`` from any thread
    to make the engine drop the row at its next step.
    """

    prompt_ids: list[int]
    sink: Callable[[Event], None]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    stream: bool = True  # False: no ``text`` events, only the whole text in ``done``
    ignore_eos: bool = False  # generate max_tokens whatever comes (vLLM's extension; for benchmarks)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)


class Row:
    """A request admitted into the batch: its generated tokens and how much text was already sent."""

    def __init__(self, req: GenRequest, internal: str | None, tokenizer, eos: set[int]):
        self.req, self.internal, self.tok = req, internal, tokenizer
        self.eos = set() if req.ignore_eos else eos
        self.tokens: list[int] = []
        self.generated = 0  # tokens the model produced, an end-of-sequence token included
        self.text = ""
        self.sent = 0
        self.finish: str | None = None
        self.first_token_at: float | None = None
        self.closed = False  # finished and answered (the engine's _finish ran)
        self.gen = None
        if req.temperature > 0 and req.seed is not None:
            self.gen = torch.Generator().manual_seed(req.seed)

    def push(self, token: int) -> str:
        """Take the next token; returns the text that may now be sent (sets ``finish`` when done)."""
        self.generated += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            self.text = self.tok.decode(self.tokens, skip_special_tokens=True)
            # text already sent holds no stop string nor the start of one: only its last len(s)-1 characters
            # can begin a new match, so each token costs the new text, not the whole text
            cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.req.stop if s)
                       if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif self.generated >= self.req.max_tokens:
                self.finish = "length"
        end = len(self.text)
        if self.finish is None:
            end -= self._stop_prefix()
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece


    def _stop_prefix(self) -> int:
        """Length of the longest end of the text that begins a stop string (it may still become one)."""
        best = 0
        for s in self.req.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


def choose(logits: Tensor, rows: Sequence[Row]) -> list[int | Exception]:
    """The next token of every row: argmax for greedy rows, a temperature / top-p sample for the others.

    A row whose token cannot be chosen (non-finite logits) gets the exception instead: it fails alone.
    """
    tokens: list[int | Exception] = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if row.req.temperature > 0:
            try:
                tokens[i] = _sample(logits[i].float(), row.req.temperature, row.req.top_p, row.gen)
            except (RuntimeError, ValueError) as e:
                tokens[i] = e
    return tokens


def _sample(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if not torch.isfinite(logits).all():
        raise ValueError("the model's logits hold NaN or inf values")
    # in float64 and shifted so the largest is 0: any temperature > 0, however small, gives finite probabilities
    # (1e-300 is 0 in float32: the division alone would make NaN)
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < top_p  # the smallest prefix whose mass reaches top_p (always >= 1 token)
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
