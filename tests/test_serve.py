"""The OpenAI-compatible server end to end: a real uvicorn on a free localhost port, httpx as the client.

A tiny random Llama with SmolLM2's tokenizer and chat template; adapters (LoRA x2, IA3, prompt tuning, a corrupt
file, hostile symlinks) in a temporary folder. Every greedy answer is checked against ``deltatune generate`` with
the same adapter (the library's ``generation.generate`` on a fresh model with the adapter loaded alone).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import deltatune as dt
from deltatune.serve import build_app
from deltatune.serve.app import Limits
from deltatune.serve.server import BackgroundServer
from serve_helpers import IA3, LORA, LORA2, ROUTABLE, Reference, make_world, metric

PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4", "name: Aromi, food: Thai, area: riverside"]
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def ref(world) -> Reference:
    return Reference(world[0], world[1])


def _server(world, step_delay: float = 0.0, **kw) -> BackgroundServer:
    model, tok = dt.load_pretrained(world[0])
    if step_delay:  # a slow model: every forward (prefill or decode step) takes at least step_delay seconds
        model.register_forward_pre_hook(lambda *_: time.sleep(step_delay))
    kw.setdefault("limits", Limits(max_prompt_tokens=64, max_tokens=256, max_body_bytes=4096))
    return BackgroundServer(build_app(model, tok, world[1], model_name="tiny", **kw))


@pytest.fixture(scope="module")
def server(world):
    with _server(world, max_batch=8, batch_wait_ms=100, max_adapters=8) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _complete(client, model, prompt, max_tokens=8, **kw) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0, **kw})


def _sse(response: httpx.Response) -> list:
    lines = [x for x in response.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(x[6:]) for x in lines[:-1]]


# -- completions and chat ---------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, *ROUTABLE])
def test_greedy_completion_equals_deltatune_generate(client, ref, adapter):
    r = _complete(client, "tiny" if adapter is None else f"tiny:{adapter}", PROMPTS[0], max_tokens=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == ("tiny" if adapter is None else f"tiny:{adapter}")
    choice = body["choices"][0]
    assert choice["text"].strip() == ref(adapter, PROMPTS[0], 10)
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 10 and body["usage"]["total_tokens"] == 10 + body["usage"][
        "prompt_tokens"]


def test_adapters_change_the_answer(ref):
    answers = {ref(a, PROMPTS[0], 10) for a in [None, *ROUTABLE]}
    assert len(answers) == 4  # otherwise the equality tests would not tell adapters apart


def test_chat_completion_uses_the_chat_template_like_deltatune_generate(client, ref):
    r = client.post("/v1/chat/completions", json={"model": f"tiny:{LORA2}", "max_tokens": 9, "temperature": 0,
                                                  "messages": [{"role": "user", "content": PROMPTS[1]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"].strip() == ref(LORA2, PROMPTS[1], 9, chat=True)


def test_a_bare_adapter_name_is_a_model_too(client, ref):
    r = _complete(client, IA3, PROMPTS[2], max_tokens=6)
    assert r.status_code == 200 and r.json()["choices"][0]["text"].strip() == ref(IA3, PROMPTS[2], 6)


def test_stop_sequence_ends_the_output_without_it(client):
    full = _complete(client, f"tiny:{LORA}", PROMPTS[3], max_tokens=12).json()["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    r = _complete(client, f"tiny:{LORA}", PROMPTS[3], max_tokens=12, stop=[stop])
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={"model": f"tiny:{LORA}", "prompt": PROMPTS[3], "max_tokens": 12,
                                                        "temperature": 0, "stop": stop, "stream": True}) as s:
        chunks = _sse(s)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats_and_tiny_top_p_is_greedy(client):
    def ask(**kw):
        return client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8,
                                                    **kw}).json()["choices"][0]["text"]

    assert ask(temperature=1.5, seed=7) == ask(temperature=1.5, seed=7)
    assert ask(temperature=1.0, top_p=1e-6, seed=1) == ask(temperature=0)


# -- streaming --------------------------------------------------------------------------------------
def test_streamed_completion_joins_to_the_non_streamed_text(client):
    want = _complete(client, f"tiny:{LORA}", PROMPTS[1], max_tokens=10).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"model": f"tiny:{LORA}", "prompt": PROMPTS[1], "max_tokens": 10,
                                                        "temperature": 0, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(s)
    assert all(c["object"] == "text_completion" for c in chunks) and len({c["id"] for c in chunks}) == 1
    assert len(chunks) > 2 and "".join(c["choices"][0]["text"] for c in chunks) == want
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_streamed_chat_has_role_content_finish_and_usage(client, ref):
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 7, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": PROMPTS[0]}]}) as s:
        chunks = _sse(s)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text.strip() == ref(None, PROMPTS[0], 7, chat=True)


# -- models and adapters ----------------------------------------------------------------------------
def test_models_lists_the_base_and_every_servable_adapter(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == "tiny"
    # "empty" has no config; "escape" and "linked" lead out of the folder; none of them is listed
    assert sorted(ids[1:]) == sorted(f"tiny:{n}" for n in [LORA, LORA2, IA3, "bad", "prompt"])


def test_load_and_unload(client):
    client.post("/v1/adapters/unload", json={"name": LORA2})  # whatever earlier tests left
    r = client.post("/v1/adapters/load", json={"name": LORA2})
    assert r.status_code == 200 and r.json()["loaded"] and r.json()["bytes"] > 0
    assert client.post("/v1/adapters/load", json={"name": LORA2}).json()["already_loaded"]
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[f"tiny:{LORA2}"]["loaded"]
    assert client.post("/v1/adapters/unload", json={"name": LORA2}).json() == {"name": LORA2, "unloaded": True}
    assert not {m["id"]: m for m in client.get("/v1/models").json()["data"]}[f"tiny:{LORA2}"]["loaded"]
    r = client.post("/v1/adapters/unload", json={"name": LORA2})
    assert r.status_code == 404 and "not loaded" in r.json()["error"]["message"]
    assert client.post("/v1/adapters/load", json={"name": "nope"}).status_code == 404
    assert client.post("/v1/adapters/load", json={"name": LORA2, "path": "/tmp"}).status_code == 400


@pytest.mark.parametrize("how", ["load", "request"])
def test_a_bad_adapter_file_is_rejected_and_the_server_keeps_serving(client, ref, how):
    r = (client.post("/v1/adapters/load", json={"name": "bad"}) if how == "load"
         else _complete(client, "tiny:bad", PROMPTS[0]))
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "'bad'" in msg and "not a readable safetensors file" in msg and str(os.sep + "adapters") not in msg
    ok = _complete(client, f"tiny:{LORA}", PROMPTS[0], max_tokens=5)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].strip() == ref(LORA, PROMPTS[0], 5)


@pytest.mark.parametrize("config", ["[]", "[" * 50_000 + "]" * 50_000, '{"deltatune": {"type": "lora", "config": []}}',
                                    '{"peft_type": "LORA", "r": "four", "target_modules": 7}'],
                         ids=["list", "deeply-nested", "config-list", "wrong-kinds"])
@pytest.mark.parametrize("how", ["load", "request"])
def test_a_malformed_adapter_config_is_a_400_and_the_server_keeps_serving(world, client, ref, config, how):
    folder = world[1] / "malformed"
    folder.mkdir()
    try:
        (folder / "adapter_config.json").write_text(config)
        (folder / "adapter_model.safetensors").write_bytes((world[1] / LORA / "adapter_model.safetensors").read_bytes())
        r = (client.post("/v1/adapters/load", json={"name": "malformed"}) if how == "load"
             else _complete(client, "tiny:malformed", PROMPTS[0]))
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"], r.text
    finally:
        shutil.rmtree(folder)
    ok = _complete(client, f"tiny:{LORA}", PROMPTS[0], max_tokens=5)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].strip() == ref(LORA, PROMPTS[0], 5)
    assert client.get("/health").json()["running"] == 0


def test_an_input_level_adapter_is_refused_with_the_reason(client):
    r = _complete(client, "tiny:prompt", PROMPTS[0])
    assert r.status_code == 400 and "cannot be routed per row" in r.json()["error"]["message"]
    assert "prompt" not in client.get("/health").json() and client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("name, status", [
    ("../outside", 400), ("..", 400), ("/etc", 400), ("a/../../outside", 400), ("escape", 403), ("linked", 403),
    ("a\\..\\x", 400), ("", 400),
])
def test_adapter_names_cannot_leave_the_folder(client, name, status):
    assert client.post("/v1/adapters/load", json={"name": name}).status_code == status
    r = _complete(client, f"tiny:{name}", PROMPTS[0])
    assert r.status_code == status, r.text
    assert not any(m.get("root") in ("escape", "linked", "secret")
                   for m in client.get("/v1/models").json()["data"])


def test_lru_eviction_by_count_and_by_bytes(world):
    with _server(world, max_adapters=2) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for name in (LORA, LORA2):
            assert _complete(c, f"tiny:{name}", PROMPTS[0], max_tokens=2).status_code == 200
        assert _complete(c, f"tiny:{LORA}", PROMPTS[0], max_tokens=2).status_code == 200  # LORA2 is now the LRU
        r = c.post("/v1/adapters/load", json={"name": IA3})
        assert r.json()["evicted"] == [LORA2]
        loaded = {m["root"] for m in c.get("/v1/models").json()["data"] if m.get("loaded")}
        assert loaded == {LORA, IA3}
        assert metric(c.get("/metrics").text, "deltatune_adapters_loaded") == 2
    sizes = {}
    with _server(world) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for name in (LORA, LORA2, IA3):
            sizes[name] = c.post("/v1/adapters/load", json={"name": name}).json()["bytes"]
    budget = sizes[LORA] + sizes[IA3]  # room for these two, not for all three
    with _server(world, max_adapter_bytes=budget) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        assert c.post("/v1/adapters/load", json={"name": LORA}).json()["evicted"] == []
        assert c.post("/v1/adapters/load", json={"name": IA3}).json()["evicted"] == []
        assert c.post("/v1/adapters/load", json={"name": LORA2}).json()["evicted"] == [LORA]
        assert metric(c.get("/metrics").text, "deltatune_adapter_bytes") <= budget
    with _server(world, max_adapter_bytes=sizes[IA3]) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/adapters/load", json={"name": LORA})
        assert r.status_code == 413 and "--max-adapter-bytes" in r.json()["error"]["message"]


# -- safety -----------------------------------------------------------------------------------------
def test_api_key_is_required_when_set(world):
    with _server(world, api_key=KEY) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        good = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/health").status_code == 200  # liveness stays open
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions",
                                                                 {"model": "tiny", "prompt": "x", "max_tokens": 1}),
                                   ("POST", "/v1/adapters/load", {"name": LORA}), ("GET", "/metrics", None)]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
            assert c.request(method, path, json=body, headers=good).status_code == 200, path


def test_limits_answer_4xx_with_clear_messages(client):
    big = "x" * 5000
    r = client.post("/v1/completions", content=json.dumps({"model": "tiny", "prompt": big}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

    def chunked():
        for _ in range(10):
            yield b" " * 1000

    assert client.post("/v1/completions", content=chunked()).status_code == 413  # no content-length to trust
    r = _complete(client, "tiny", "word " * 100)
    assert r.status_code == 400 and "limit of 64" in r.json()["error"]["message"]
    r = _complete(client, "tiny", "hi", max_tokens=1000)
    assert r.status_code == 400 and "max_tokens=1000" in r.json()["error"]["message"]
    for body, word in [({"model": "tiny", "prompt": "hi", "n": 2}, "n=2"), ({"model": "tiny"}, "prompt"),
                       ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
                       ({"model": "tiny", "prompt": ["a", "b"]}, "one prompt"),
                       ({"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
                       ({"model": "tiny", "prompt": "hi", "stop": "x" * 257}, "at most 256 characters")]:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and word in r.json()["error"]["message"], body
    for raw, word in [(b"{not json", "not valid JSON"), (b'{"model": "tiny", "logprobs": ' + b"[" * 3000, "nested"),
                      (b"[1, 2]", "JSON object")]:
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and word in r.json()["error"]["message"], raw[:40]
    r = _complete(client, "gpt-4", "hi")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_web_page_cannot_drive_the_server(world, client):
    """A keyless loopback server: a page the user visits may POST text/plain cross-site with no preflight. Any
    Origin not allowed is refused before anything runs; a body not declared JSON is refused too."""
    assert client.post("/v1/adapters/load", json={"name": LORA}).status_code == 200
    loaded = client.get("/health").json()["adapters_loaded"]
    page = {"origin": "https://evil.example", "content-type": "text/plain"}
    body = json.dumps({"name": LORA})
    r = client.post("/v1/adapters/unload", content=body, headers=page)
    assert r.status_code == 403 and "--allow-origin https://evil.example" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers={"origin": "null"})
    assert r.status_code == 403  # sandboxed frames and file: pages send "null"
    r = client.post("/v1/adapters/unload", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert client.get("/health").json()["adapters_loaded"] == loaded  # nothing was unloaded
    with _server(world, limits=Limits(allowed_origins=("https://app.example",))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as allowed:
        r = allowed.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0},
                         headers={"origin": "https://app.example"})
        assert r.status_code == 200, r.text
        r = allowed.post("/v1/completions", json={"model": "tiny", "prompt": "hi"},
                         headers={"origin": "https://evil.example"})
        assert r.status_code == 403


def test_health_and_metrics_answer_while_an_adapter_loads(world):
    """A load reads files and builds deltas on the engine's thread; the registry's lock is not held meanwhile.
    The load here waits until /health, /metrics and /v1/models have answered: were they blocked by it, they
    would time out (5 s) and the load would never finish."""
    from deltatune.serve import AdapterRegistry, Engine, Metrics
    from deltatune.serve.app import create_app

    model, tok = dt.load_pretrained(world[0])
    dm = dt.DeltaModel(model)
    registry = AdapterRegistry(dm, world[1])
    reading, answered = threading.Event(), threading.Event()
    real_load = dm.load

    def slow_load(*a, **kw):  # a slow disk: the load is inside its file reads until the probes have answered
        reading.set()
        assert answered.wait(30), "the probes never answered"
        return real_load(*a, **kw)

    dm.load = slow_load
    app = create_app(Engine(dm, tok, registry, metrics=Metrics()), "tiny")
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=5) as probe, \
            httpx.Client(base_url=server.url, timeout=60) as admin:
        result = {}
        loader = threading.Thread(target=lambda: result.update(
            r=admin.post("/v1/adapters/load", json={"name": LORA})))
        loader.start()
        assert reading.wait(30)
        try:
            assert probe.get("/health").json()["adapters_loaded"] == 0  # the load is not done: nothing counted
            assert probe.get("/metrics").status_code == 200
            assert probe.get("/v1/models").status_code == 200
        finally:
            answered.set()
            loader.join(60)
        assert result["r"].status_code == 200 and probe.get("/health").json()["adapters_loaded"] == 1


def test_a_full_queue_answers_429_with_retry_after_and_frees_as_it_drains(world):
    # one row at a time, 5 ms a step: the first request runs, the second waits, the third finds the queue full
    with _server(world, step_delay=0.005, max_batch=1,
                 limits=Limits(max_waiting=1, max_tokens=256)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0}
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the stream
            assert next(lines).startswith("data: ")  # admitted and decoding
            waiting = threading.Thread(target=lambda: client.post("/v1/completions", json=body))
            waiting.start()
            deadline = time.monotonic() + 20
            while client.get("/health").json()["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "server_busy" and "limit: 1" in r.json()["error"]["message"]
        waiting.join(60)
        assert client.post("/v1/completions", json=body).status_code == 200  # drained: served again


class _GatedTokenizer:
    """The model's tokenizer, except that encoding text waits for ``gate`` (a slow, huge prompt)."""

    def __init__(self, tok, gate: threading.Event, entered: threading.Event):
        self._tok, self._gate, self._entered = tok, gate, entered

    def __call__(self, *args, **kwargs):
        self._entered.set()
        assert self._gate.wait(30)
        return self._tok(*args, **kwargs)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_tokenising_a_prompt_does_not_stall_the_event_loop(world):
    from deltatune.serve import AdapterRegistry, Engine, Metrics
    from deltatune.serve.app import create_app

    model, tok = dt.load_pretrained(world[0])
    gate, entered = threading.Event(), threading.Event()
    dm = dt.DeltaModel(model)
    engine = Engine(dm, _GatedTokenizer(tok, gate, entered), AdapterRegistry(dm, world[1]), metrics=Metrics())
    with BackgroundServer(create_app(engine, "tiny")) as server, \
            httpx.Client(base_url=server.url, timeout=5) as probe, httpx.Client(base_url=server.url, timeout=60) as c:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=c.post("/v1/completions", json={
            "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0})))
        t.start()
        assert entered.wait(30)
        try:
            assert probe.get("/health").status_code == 200  # answered while the prompt is being tokenised
        finally:
            gate.set()
            t.join(60)
        assert result["r"].status_code == 200


def test_a_loopback_server_answers_only_to_its_own_host_names(world):
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1; its requests (GETs included, which
    carry no Origin) then say 'Host: evil.example'. A loopback server answers only to its own names."""
    from deltatune.serve.server import loopback_limits

    limits = loopback_limits("127.0.0.1", Limits(max_tokens=8))
    assert set(limits.allowed_hosts) == {"localhost", "127.0.0.1", "::1"} and limits.max_tokens == 8
    assert loopback_limits("0.0.0.0", None).allowed_hosts is None  # reachable by name from elsewhere: no list
    assert loopback_limits("127.0.0.1", Limits(allowed_hosts=("box",))).allowed_hosts == ("box",)
    with _server(world, limits=limits) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/health", "/v1/models", "/metrics"):
            r = client.get(path, headers={"host": f"evil.example:{server.port}"})
            assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"], path
        assert client.get("/health").status_code == 200  # Host: 127.0.0.1:PORT
        for name in ("localhost", "LOCALHOST", "[::1]"):
            assert client.get("/health", headers={"host": f"{name}:{server.port}"}).status_code == 200, name


# -- batching ---------------------------------------------------------------------------------------
def test_sampling_faults_answer_their_request_alone_and_leak_nothing(world, ref):
    """A seed outside the generator's range is refused at the schema; a vanishing temperature is valid (it samples
    the greedy token). Meanwhile a running request finishes with its own tokens, and no adapter stays pinned."""
    # 5 ms a step: the 40-token stream is still running while the other requests come and go
    with _server(world, step_delay=0.005) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        _sampling_faults(client, ref)


def _sampling_faults(client: httpx.Client, ref) -> None:
    with client.stream("POST", "/v1/completions", json={"model": f"tiny:{LORA}", "prompt": PROMPTS[1],
                                                        "max_tokens": 40, "temperature": 0, "stream": True}) as s:
        lines = s.iter_lines()
        first = next(lines)  # the stream is running
        r = client.post("/v1/completions", json={"model": f"tiny:{LORA2}", "prompt": PROMPTS[0], "max_tokens": 5,
                                                 "temperature": 0.7, "seed": 2**70})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
        assert "less than or equal to 18446744073709551615" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": f"tiny:{LORA2}", "prompt": PROMPTS[0], "max_tokens": 10,
                                                 "temperature": 1e-300})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip() == ref(LORA2, PROMPTS[0], 10)
        streamed = _sse_lines([first, *lines])
    assert "".join(c["choices"][0]["text"] for c in streamed).strip() == ref(LORA, PROMPTS[1], 40)
    for name in (LORA, LORA2):  # unpinned: both unload
        assert client.post("/v1/adapters/unload", json={"name": name}).status_code == 200


def _sse_lines(lines: list[str]) -> list:
    lines = [x for x in lines if x]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(x[6:]) for x in lines[:-1]]


def test_concurrent_requests_for_different_adapters_are_batched_and_correct(server, ref):
    jobs = [(adapter, PROMPTS[i % len(PROMPTS)]) for i, adapter in enumerate([None, *ROUTABLE] * 2)]
    before = httpx.get(server.url + "/metrics").text

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*[
                c.post("/v1/completions", json={"model": "tiny" if a is None else f"tiny:{a}", "prompt": p,
                                                "max_tokens": 8, "temperature": 0}) for a, p in jobs])

    answers = asyncio.run(run())
    for (adapter, prompt), r in zip(jobs, answers):
        assert r.status_code == 200 and r.json()["choices"][0]["text"].strip() == ref(adapter, prompt, 8), adapter
    after = httpx.get(server.url + "/metrics").text

    def passes(text, name, le):
        count = metric(text, f"{name}_count", phase="decode")
        return count, count - metric(text, f"{name}_bucket", phase="decode", le=le)

    total = passes(after, "deltatune_batch_size", "1")[0] - passes(before, "deltatune_batch_size", "1")[0]
    wide = passes(after, "deltatune_batch_size", "4")[1] - passes(before, "deltatune_batch_size", "4")[1]
    mixed = passes(after, "deltatune_batch_adapters", "3")[1] - passes(before, "deltatune_batch_adapters", "3")[1]
    assert total > 0 and wide > 0  # some decode steps ran more than 4 rows at once ...
    assert mixed > 0  # ... for all 4 models (base + 3 adapters) in one forward pass


def test_a_client_that_disconnects_mid_stream_frees_its_slot(world):
    # 5 ms a step: 200 tokens take over a second, whatever the machine, far longer than the clients wait
    with _server(world, step_delay=0.005, max_batch=8) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        cancelled = metric(client.get("/metrics").text, "deltatune_generations_total", reason="cancelled")
        with client.stream("POST", "/v1/completions", json={"model": f"tiny:{LORA}", "prompt": PROMPTS[0],
                                                            "max_tokens": 200, "temperature": 0, "stream": True}) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
        with httpx.Client(base_url=client.base_url, timeout=0.3) as impatient:  # a non-streaming client giving up
            with pytest.raises(httpx.ReadTimeout):
                _complete(impatient, f"tiny:{LORA2}", PROMPTS[0], max_tokens=200)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = client.get("/metrics").text
            if metric(text, "deltatune_generations_total", reason="cancelled") == cancelled + 2:
                break
            time.sleep(0.05)
        assert metric(text, "deltatune_generations_total", reason="cancelled") == cancelled + 2
        assert client.get("/health").json()["running"] == 0
        r = client.post("/v1/adapters/unload", json={"name": LORA})  # no longer pinned by the dropped rows
        assert r.status_code == 200


def test_metrics_page_is_prometheus_text(client):
    text = client.get("/metrics").text
    for name in ["deltatune_requests_total", "deltatune_generated_tokens_total", "deltatune_batch_size",
                 "deltatune_request_latency_seconds", "deltatune_adapters_loaded"]:
        assert f"# TYPE {name} " in text
    assert metric(text, "deltatune_requests_total", endpoint="/v1/completions", status="200") > 0
    assert metric(text, "deltatune_request_latency_seconds_count") > 0


# -- the command line, and a real model -------------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~15 s on a busy machine
def test_deltatune_serve_command_serves(world, ref):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DELTATUNE_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--model", str(world[0]), "--adapters",
                             str(world[1]), "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                       json={"model": "tiny:a", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
        assert r.json()["choices"][0]["text"].strip() == ref(LORA, PROMPTS[0], 6)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_smollm2_with_a_trained_adapter_answers_like_deltatune_generate(tmp_path):
    """The real SmolLM2-135M-Instruct and a LoRA trained a few steps: chat answers equal the library's."""
    import torch

    from deltatune.generation import generate as lib_generate

    model, tok = dt.load_pretrained("smollm2-135m")
    dm = dt.attach(model, dt.LoRAConfig(r=8, alpha=16))
    enc = tok(["Aromi is a Thai restaurant in the city centre. It is family friendly."], return_tensors="pt")
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=2e-3)
    dm.train()
    for _ in range(8):
        dm(**enc, labels=enc["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    dm.eval()
    dm.save(tmp_path / "adapters" / "aromi")
    prompt = "Describe the restaurant Aromi in one sentence."
    want = lib_generate(dm, tok, [prompt], max_new_tokens=16)[0]
    with dm.disabled():
        base = lib_generate(dm, tok, [prompt], max_new_tokens=16)[0]
    assert want != base
    plain, tok = dt.load_pretrained("smollm2-135m")
    with BackgroundServer(build_app(plain, tok, tmp_path / "adapters", model_name="smollm2")) as s:
        async def ask_both():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                return await asyncio.gather(*[
                    c.post("/v1/chat/completions", json={"model": m, "max_tokens": 16, "temperature": 0,
                                                         "messages": [{"role": "user", "content": prompt}]})
                    for m in ("smollm2:aromi", "smollm2")])

        adapted, plain_answer = asyncio.run(ask_both())
    assert adapted.json()["choices"][0]["message"]["content"].strip() == want
    assert plain_answer.json()["choices"][0]["message"]["content"].strip() == base
