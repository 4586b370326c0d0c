"""The serving engine without HTTP: continuous batching (rows joining and leaving mid-generation), adapter pinning
under a full cache, recovery from a failing step. Outputs are checked against ``deltatune generate``."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.serve import AdapterRegistry, Engine, GenRequest
from deltatune.serve.metrics import Histogram
from deltatune.serve.rows import Row
from serve_helpers import IA3, LORA, LORA2, Reference, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def ref(world) -> Reference:
    return Reference(world[0], world[1])


def _engine(world, **kw) -> Engine:
    model, tok = dt.load_pretrained(world[0])
    dm = dt.DeltaModel(model)
    registry = AdapterRegistry(dm, world[1], max_adapters=kw.pop("max_adapters", 8))
    return Engine(dm, tok, registry, **kw)


class Job:
    """A request plus what the engine told it."""

    def __init__(self, engine: Engine, prompt: str, adapter: str | None, max_tokens: int, **kw):
        self.events, self.done = [], threading.Event()
        self.first_text = threading.Event()
        ids = engine.tok(prompt, add_special_tokens=False)["input_ids"]
        kw.setdefault("temperature", 0)
        self.req = GenRequest(ids, self._sink, adapter=adapter, max_tokens=max_tokens, **kw)
        self.prompt, self.adapter, self.max_tokens = prompt, adapter, max_tokens
        engine.submit(self.req)

    def _sink(self, ev) -> None:
        self.events.append(ev)
        if ev.kind == "text":
            self.first_text.set()
        if ev.kind in ("done", "error"):
            self.done.set()

    def result(self, timeout: float = 60):
        assert self.done.wait(timeout), "no answer"
        return self.events[-1]


def test_rows_join_and_leave_a_running_batch_without_changing_any_output(world, ref):
    engine = _engine(world, max_batch=8, batch_wait_ms=0)
    engine.start()
    try:
        first = Job(engine, "Hi", LORA, 24)
        assert first.first_text.wait(30)
        # joins while `first` runs: one prompt longer than the running cache (it gets padded), one shorter
        longer = Job(engine, "name: Aromi, food: Thai, area: riverside, near: the bridge, rating: 5", LORA2, 6)
        shorter = Job(engine, "Yo", None, 12)
        ia3 = Job(engine, "The quick brown fox", IA3, 3)
        for job in (first, longer, shorter, ia3):
            ev = job.result()
            assert ev.kind == "done" and ev.finish_reason == "length", ev
            assert ev.text.strip() == ref(job.adapter, job.prompt, job.max_tokens), job.adapter
            assert "".join(e.text for e in job.events if e.kind == "text") == ev.text
        assert engine.metrics.batch_size.max_bucket(phase="decode") >= 3
        assert engine.metrics.batch_adapters.max_bucket(phase="decode") >= 3
        assert engine.rows == [] and engine.registry.loaded()  # everyone left; adapters stay cached, unpinned
        assert all(e.pins == 0 for e in engine.registry._loaded.values())
    finally:
        engine.stop()


def test_a_full_adapter_cache_makes_requests_wait_not_fail(world, ref):
    engine = _engine(world, max_batch=4, batch_wait_ms=50, max_adapters=1)
    engine.start()
    try:
        jobs = [Job(engine, "Hello there", a, 5) for a in (LORA, LORA2, IA3)]
        for job in jobs:
            ev = job.result()
            assert ev.kind == "done" and ev.text.strip() == ref(job.adapter, job.prompt, 5)
        assert engine.registry.evictions == 2 and len(engine.registry.loaded()) == 1
    finally:
        engine.stop()


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(world, ref):
    engine = _engine(world, batch_wait_ms=0)
    real = engine.dm.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    engine.dm.forward = flaky
    engine.start()
    try:
        ev = Job(engine, "Hello there", LORA, 4).result()
        assert ev.kind == "error" and ev.status == 500 and "boom" in ev.text
        assert engine.registry._loaded[LORA].pins == 0
        ev = Job(engine, "Hello there", LORA, 4).result()
        assert ev.kind == "done" and ev.text.strip() == ref(LORA, "Hello there", 4)
    finally:
        engine.stop()


def test_a_row_whose_sampling_fails_fails_alone_and_the_batch_goes_on(world, ref, monkeypatch):
    import deltatune.serve.rows as rows

    real, draws = rows._sample, []

    def flaky(logits, t, p, gen):  # the row at temperature 0.5 draws its first token, then its sampling breaks
        if t == 0.5:
            draws.append(1)
            if len(draws) > 1:
                raise RuntimeError("bad draw")
        return real(logits, t, p, gen)

    monkeypatch.setattr(rows, "_sample", flaky)
    engine = _engine(world, max_batch=8, batch_wait_ms=0)
    real_forward = engine.dm.forward
    engine.dm.forward = lambda *a, **k: time.sleep(0.005) or real_forward(*a, **k)  # 24 steps outlast the join
    engine.start()
    try:
        running = Job(engine, "Hello there", LORA, 24)
        assert running.first_text.wait(30)
        ev = Job(engine, "Hi", LORA2, 8, temperature=0.5).result()  # joins the running batch, then fails in it
        assert ev.kind == "error" and ev.status == 500 and "bad draw" in ev.text
        ev = running.result()
        assert ev.kind == "done" and ev.text.strip() == ref(LORA, "Hello there", 24)  # unchanged by the failure
        assert all(e.pins == 0 for e in engine.registry._loaded.values())
        assert engine.metrics.finished.value(reason="error") == 1
        assert engine.metrics.batch_size.max_bucket(phase="decode") >= 2  # the two rows did share the batch
    finally:
        engine.stop()


def test_a_request_the_engine_cannot_start_is_refused_and_unpinned(world, ref):
    engine = _engine(world, batch_wait_ms=0)
    engine.start()
    try:
        # no schema in front: torch.Generator refuses the seed when the engine builds the row
        ev = Job(engine, "Hello there", LORA, 4, temperature=0.7, seed=2**70).result()
        assert ev.kind == "error" and ev.status == 400 and "cannot start this request" in ev.text
        assert engine.registry._loaded[LORA].pins == 0
        ev = Job(engine, "Hello there", LORA, 4).result()
        assert ev.kind == "done" and ev.text.strip() == ref(LORA, "Hello there", 4)
    finally:
        engine.stop()


def test_a_tiny_temperature_samples_the_greedy_token():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.999])
    for t in (1e-300, 1e-30, 1e-8):
        assert rows_sample(logits, t) == 1
    with pytest.raises(ValueError, match="NaN or inf"):
        rows_sample(torch.tensor([0.0, float("nan")]), 1.0)


def rows_sample(logits, temperature):
    from deltatune.serve.rows import _sample

    return _sample(logits, temperature, 1.0, torch.Generator().manual_seed(0))


def test_cancelled_rows_leave_and_unpin(world):
    engine = _engine(world, batch_wait_ms=0)
    engine.start()
    try:
        job = Job(engine, "Hello there", LORA, 1000)
        assert job.first_text.wait(30)
        job.req.cancelled = True
        ev = job.result()
        assert ev.kind == "done" and ev.finish_reason == "cancelled" and ev.completion_tokens < 1000
        assert engine.rows == [] and engine.registry._loaded[LORA].pins == 0
    finally:
        engine.stop()


def test_bad_engine_arguments_and_empty_prompts_are_refused(world):
    with pytest.raises(ValueError, match="max_batch"):
        _engine(world, max_batch=0)
    engine = _engine(world)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit(GenRequest([], lambda ev: None))


def test_histogram_buckets_are_cumulative():
    h = Histogram("x", "help", (1, 2, 4), ("phase",))
    for v in (1, 2, 3, 9):
        h.observe(v, phase="decode")
    lines = h.render()
    assert 'x_bucket{phase="decode",le="1"} 1' in lines and 'x_bucket{phase="decode",le="4"} 3' in lines
    assert 'x_bucket{phase="decode",le="+Inf"} 4' in lines and 'x_sum{phase="decode"} 15' in lines
    assert h.max_bucket(phase="decode") == float("inf") and h.count(phase="decode") == 4


def test_the_serve_command_passes_its_options_through(monkeypatch, tmp_path):
    from deltatune import cli
    from deltatune.serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda *a, **kw: seen.update(args=a, **kw))
    monkeypatch.setenv("DELTATUNE_API_KEY", "from-env")
    r = CliRunner().invoke(cli.app, ["serve", "--model", "m", "--adapters", str(tmp_path), "--max-batch", "4",
                                     "--batch-wait-ms", "5", "--max-adapters", "3", "--max-tokens", "64",
                                     "--allow-origin", "https://app.example"])
    assert r.exit_code == 0, r.output
    assert seen["args"] == ("m", tmp_path) and seen["host"] == "127.0.0.1" and seen["api_key"] == "from-env"
    assert (seen["max_batch"], seen["batch_wait_ms"], seen["max_adapters"]) == (4, 5.0, 3)
    assert seen["limits"].max_tokens == 64 and seen["limits"].allowed_origins == ("https://app.example",)
    monkeypatch.setattr(server, "serve", lambda *a, **kw: (_ for _ in ()).throw(FileNotFoundError("nope: missing")))
    r = CliRunner().invoke(cli.app, ["serve", "--model", "m", "--adapters", str(tmp_path)])
    assert r.exit_code == 2 and "nope: missing" in r.output


def test_routing_refuses_nothing_the_registry_accepts(world):
    """Every adapter the registry loads can be routed per row (input-level ones are refused at load)."""
    engine = _engine(world)
    for name in engine.registry.available():
        try:
            engine.registry.load(name)
        except Exception:  # noqa: BLE001 - bad/prompt adapters are refused, which is the point
            continue
    names = [engine.registry.internal(n) for n in engine.registry.loaded()]
    assert len(names) == 3
    ids = torch.tensor([[5, 6, 7]] * len(names))
    with torch.inference_mode():
        engine.dm(input_ids=ids, adapters=names)


class _Chars:
    """A tokenizer whose token i is the character chr(i): decoding is exact and easy to reason about."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _row(stop=(), max_tokens=50, ignore_eos=False) -> Row:
    req = GenRequest([1], lambda ev: None, max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos)
    return Row(req, None, _Chars(), eos={0})


def test_streaming_holds_back_what_a_stop_string_may_remove():
    row = _row(stop=["END"])
    sent = [row.push(ord(c)) for c in "abcEN"]
    assert "".join(sent) == "abc" and row.finish is None  # "EN" may start "END": held back
    assert row.push(ord("X")) == "ENX"  # it did not
    assert "".join(row.push(ord(c)) for c in "yEND") == "y" and row.finish == "stop" and row.text == "abcENXy"


def test_end_of_sequence_and_max_tokens_and_ignore_eos():
    row = _row(max_tokens=3)
    assert row.push(ord("a")) == "a" and row.push(0) == "" and row.finish == "stop" and row.generated == 2
    row = _row(max_tokens=3, ignore_eos=True)
    for t in (ord("a"), 0, ord("b")):
        row.push(t)
    assert row.finish == "length" and row.generated == 3


def test_half_a_character_is_never_sent():
    row = _row()
    assert row.push(ord("a")) == "a"
    assert row.push(0xFFFD) == ""  # how a tokenizer decodes an incomplete UTF-8 sequence
    assert row.push(ord("b")) == "\ufffdb"


def test_a_refused_adapter_is_answered_from_memory_until_its_files_change(world, tmp_path):
    """A client retrying a broken adapter must not make the worker read and build it again on every request; a
    fixed adapter (its files rewritten) is read afresh and loads."""
    import shutil

    from deltatune.serve import AdapterError

    root = tmp_path / "adapters"
    shutil.copytree(world[1] / LORA, root / "fixme")
    good_config = (root / "fixme" / "adapter_config.json").read_text()
    (root / "fixme" / "adapter_config.json").write_text("[]")
    model, _ = dt.load_pretrained(world[0])
    dm = dt.DeltaModel(model)
    registry = AdapterRegistry(dm, root)
    reads = []
    real_load = dm.load
    dm.load = lambda *a, **k: (reads.append(a[0]), real_load(*a, **k))[1]
    for _ in range(3):
        with pytest.raises(AdapterError, match="adapter_config.json") as e:
            registry.acquire("fixme")
        assert e.value.status == 400 and e.value.code == "invalid_adapter_file"
    assert len(reads) == 1 and not dm.configs
    (root / "fixme" / "adapter_config.json").write_text(good_config)
    internal = registry.acquire("fixme")
    assert len(reads) == 2 and internal in dm.configs
