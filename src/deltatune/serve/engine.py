"""The engine: one worker thread runs the model; requests for different adapters share its forward passes.

Why its own decoding loop rather than ``dm.generate(adapters=...)``: a served batch needs per-row ``max_tokens``
and stop strings, text streamed token by token, rows that leave as soon as they finish (or their client goes
away), and new requests that join between steps (continuous batching). transformers' ``generate`` runs one
fixed batch to the end, so the engine steps the model itself with the KV cache:

- **admit**: waiting requests (after a ``batch_wait_ms`` window when the engine was idle, so requests arriving
  together start together) get their adapters pinned (loaded on first use) and are prefilled together,
  left-padded, with per-row routing ``dm(..., adapters=[...])``; their cache is spliced into the running batch's.
- **decode**: one forward for every running row, whatever its adapter: the base runs once for the batch and each
  adapter's delta on its rows (``Site._routed``).
- **leave**: rows that hit an end-of-sequence token, a stop string, their ``max_tokens`` or a cancellation
  leave the batch at once; their adapter is unpinned.

Greedy rows pick the argmax exactly as ``generate`` does, with positions and masks as ``generate`` builds them for
left padding, so a request's output equals ``deltatune generate`` with the same adapter.

Everything that touches the model (forwards, adapter loads and unloads) runs on the worker; other threads
``submit`` requests and ``call`` functions, which run between steps.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..core import kv
from ..core.model import DeltaModel
from . import kvcache
from .adapter_cache import AdapterError, AdapterRegistry, CacheFull
from .metrics import Metrics
from .rows import Event, GenRequest, Row, choose

log = logging.getLogger("deltatune.serve")


class _Call:
    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.future = fn, concurrent.futures.Future()


class Engine:
    """Dynamic, continuous batching across adapters on one DeltaModel.

    Args:
        dm: the DeltaModel (eval mode; adapters come and go through ``registry``).
        tokenizer: decodes the output (requests arrive as token ids).
        registry: loads, pins and evicts adapters.
        max_batch: at most this many rows in a forward pass.
        batch_wait_ms: when idle, how long the first request waits for others to share its prefill.
        metrics: where batch sizes, token counts and latencies are recorded.
    """

    def __init__(self, dm: DeltaModel, tokenizer, registry: AdapterRegistry, *, max_batch: int = 8,
                 batch_wait_ms: float = 10.0, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.dm, self.tok, self.registry = dm.eval(), tokenizer, registry
        self._cache_arg = kv.cache_name(dm.model)  # past_key_values before transformers 5.25, then cache
        self.max_batch, self.wait = max_batch, batch_wait_ms / 1000
        self.metrics = metrics or Metrics()
        self.device = next(dm.parameters()).device
        eos = getattr(getattr(dm, "generation_config", None), "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self._inbox: queue.Queue = queue.Queue()
        self.pending: deque[GenRequest] = deque()
        self.rows: list[Row] = []
        self._cache = self._mask = self._last = None
        self._thread: threading.Thread | None = None
        self._check_model()

    # -- public, any thread -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="deltatune-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, req: GenRequest) -> None:
        """Queue a request; its ``sink`` hears about it from the worker thread."""
        if not req.prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        self._inbox.put(req)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker between two steps (e.g. an adapter load); returns a future of its result."""
        c = _Call(fn)
        self._inbox.put(c)
        return c.future

    @property
    def alive(self) -> bool:
        """The worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self.pending) + self._inbox.qsize()

    # -- the worker --------------------------------------------------------------------------------
    def _check_model(self) -> None:
        """One tiny forward up front: the cache must be one the batch can splice."""
        ids = torch.tensor([[self.pad]], device=self.device)
        with torch.inference_mode():
            out = self.dm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, adapters=[None])
        kvcache.check_cache(kv.output_cache(out))

    def _run(self) -> None:
        while True:
            if not self._receive(block=not self.rows and not self.pending):
                break
            try:
                self._drop_cancelled()
                if self.pending and len(self.rows) < self.max_batch:
                    self._admit()
                if self.rows:
                    self._decode()
            except Exception as e:  # a failing step must not take the server down: fail its rows, go on
                log.exception("engine step failed")
                for row in self.rows:
                    self._finish(row, error=(500, "internal_error", f"generation failed: {type(e).__name__}: {e}"))
                self.rows, self._cache = [], None
        for row in self.rows:
            self._finish(row, error=(503, "shutting_down", "the server is shutting down"))
        for req in self.pending:
            req.sink(Event("error", text="the server is shutting down", status=503, code="shutting_down"))

    def _receive(self, block: bool) -> bool:
        """Move what arrived into ``pending`` and run admin calls; False when told to stop."""
        items = []
        if block:
            items.append(self._inbox.get())
            deadline = time.perf_counter() + self.wait
            while isinstance(items[-1], GenRequest) and len(items) < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    items.append(self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait())
                except queue.Empty:
                    break
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is None:
                return False
            if isinstance(item, _Call):
                try:
                    item.future.set_result(item.fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    item.future.set_exception(e)
            else:
                self.pending.append(item)
        return True

    def _drop_cancelled(self) -> None:
        if any(r.req.cancelled for r in self.rows):
            keep = [i for i, r in enumerate(self.rows) if not r.req.cancelled]
            for r in self.rows:
                if r.req.cancelled:
                    r.finish = "cancelled"
                    self._finish(r)
            self._keep(keep)

    def _admit(self) -> None:
        group: list[Row] = []
        deferred: list[GenRequest] = []
        while self.pending and len(self.rows) + len(group) < self.max_batch:
            req = self.pending.popleft()
            if req.cancelled:
                self.metrics.finished.inc(reason="cancelled")
                continue
            try:
                internal = self.registry.acquire(req.adapter) if req.adapter is not None else None
            except CacheFull as e:
                if self.rows or group:  # adapters in use will be released: wait for them
                    deferred.append(req)
                    continue
                self._reject(req, e.status, e.code, str(e))
                continue
            except AdapterError as e:
                self._reject(req, e.status, e.code, str(e))
                continue
            try:
                row = Row(req, internal, self.tok, self.eos)
            except Exception as e:  # e.g. a seed the generator refuses, from a caller that skipped the schema
                if req.adapter is not None:
                    self.registry.release(req.adapter)
                self._reject(req, 400, "invalid_request", f"cannot start this request: {type(e).__name__}: {e}")
                continue
            req.sink(Event("start"))
            group.append(row)
        self.pending.extendleft(reversed(deferred))
        if group:
            try:
                self._prefill(group)
            except Exception as e:  # whatever failed, these rows end now and release their adapters
                log.exception("prefill failed")
                for r in group:
                    self._finish(r, error=(500, "internal_error", f"generation failed: {type(e).__name__}: {e}"))

    def _reject(self, req: GenRequest, status: int, code: str, text: str) -> None:
        self.metrics.finished.inc(reason="error")
        req.sink(Event("error", text=text, status=status, code=code))

    def _prefill(self, group: list[Row]) -> None:
        width = max(len(r.req.prompt_ids) for r in group)
        ids = torch.full((len(group), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, r in enumerate(group):
            n = len(r.req.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.req.prompt_ids)
            mask[i, width - n:] = 1
            self.metrics.prompt_tokens.inc(n)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self._forward(group, "prefill", input_ids=ids, attention_mask=mask, position_ids=pos)
        tokens = choose(out.logits[:, -1], group)
        keep = self._advance(group, tokens)
        if not keep:
            return
        cache, last = kv.output_cache(out), torch.tensor([tokens[i] for i in keep], device=self.device)
        mask = kvcache.select(cache, mask, keep) if len(keep) < len(group) else mask
        rows = [group[i] for i in keep]
        if not self.rows:
            self.rows, self._cache, self._mask, self._last = rows, cache, mask, last
        else:
            self._mask = kvcache.join(self._cache, self._mask, cache, mask)
            self.rows += rows
            self._last = torch.cat([self._last, last])

    def _decode(self) -> None:
        mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        pos = mask.sum(1, keepdim=True) - 1
        out = self._forward(self.rows, "decode", input_ids=self._last[:, None], attention_mask=mask,
                            position_ids=pos, **{self._cache_arg: self._cache})
        self._mask = mask
        tokens = choose(out.logits[:, -1], self.rows)
        # a row whose sampling failed leaves in _keep below; until then the pad id stands in for its token
        self._last = torch.tensor([t if isinstance(t, int) else self.pad for t in tokens], device=self.device)
        self._keep(self._advance(self.rows, tokens))

    def _forward(self, rows: list[Row], phase: str, **inputs):
        adapters = [r.internal for r in rows]
        self.metrics.batch_size.observe(len(rows), phase=phase)
        self.metrics.batch_adapters.observe(len(set(adapters)), phase=phase)
        with torch.inference_mode():
            return self.dm(**inputs, use_cache=True, logits_to_keep=1, adapters=adapters)

    def _advance(self, rows: list[Row], tokens: list[int | Exception]) -> list[int]:
        """Give every row its token; send new text; finish rows that are done. Returns the rows that go on.

        A row whose token could not be chosen (an exception in ``tokens``) fails alone, answered 500."""
        keep = []
        for i, (row, tok) in enumerate(zip(rows, tokens)):
            if isinstance(tok, Exception):
                log.error("sampling failed for one row: %s", tok)
                self._finish(row, error=(500, "internal_error", f"sampling failed: {tok}"))
                continue
            piece = row.push(tok)
            self.metrics.generated_tokens.inc()
            if row.generated == 1:
                self.metrics.ttft.observe(row.first_token_at - row.req.arrived)
            if piece and row.req.stream:
                row.req.sink(Event("text", text=piece))
            if row.finish is None and row.req.cancelled:
                row.finish = "cancelled"
            if row.finish is None:
                keep.append(i)
            else:
                self._finish(row)
        return keep

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._cache = self._mask = self._last = None
            return
        self._mask = kvcache.select(self._cache, self._mask, keep)
        self._last = self._last[torch.tensor(keep, device=self.device)]

    def _finish(self, row: Row, error: tuple[int, str, str] | None = None) -> None:
        """End ``row`` once: release its adapter, count it, tell its client (an error, or done)."""
        if row.closed:
            return
        row.closed = True
        if row.req.adapter is not None:
            self.registry.release(row.req.adapter)
        if error is not None:
            self.metrics.finished.inc(reason="error")
            row.req.sink(Event("error", text=error[2], status=error[0], code=error[1]))
            return
        self.metrics.finished.inc(reason=row.finish)
        if row.finish != "cancelled":
            self.metrics.latency.observe(time.perf_counter() - row.req.arrived)
        row.req.sink(Event("done", finish_reason=row.finish, prompt_tokens=len(row.req.prompt_ids),
                           completion_tokens=row.generated, text=row.text))
