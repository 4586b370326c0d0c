"""Random request bodies against a running server while good requests stream: every bad request is answered 4xx
(never 5xx, never a hang), and the good requests finish with the tokens they have alone.

The bodies come from a seeded generator (reproducible): the schema's own keys with values of every JSON kind,
near-misses of valid values (huge, negative, tiny, NaN-like strings, deep nesting, wrong types), and raw bytes
that are not JSON at all.
"""

from __future__ import annotations

import json
import os
import random
import threading

import httpx
import pytest

import deltatune as dt
from deltatune.serve import build_app
from deltatune.serve.app import Limits
from deltatune.serve.server import BackgroundServer
from serve_helpers import IA3, LORA, LORA2, Reference, make_world

KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
        "stream", "stream_options", "n", "seed", "logprobs", "logit_bias", "ignore_eos", "echo", "best_of",
        "suffix", "tools", "name"]
MODELS = ["tiny", f"tiny:{LORA}", f"tiny:{LORA2}", IA3, "tiny:bad", "tiny:prompt", "tiny:../outside/secret",
          "tiny:escape", "tiny:linked", "tiny:nope", "", ":", "tiny:", "gpt-4"]


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(14)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2, 7, 255, 2**31, 2**63, 2**64, 2**70, -(2**70)])
    if kind == 3:
        return rng.choice([0.0, 1e-300, 1e-30, 0.5, 1.0, 2.0, 2.0000001, 1e308, -1e308, -0.0, 5e-324])
    if kind == 4:
        return rng.choice(["", "hi", "The quick brown fox", "\x00", "\ud7ff", "é" * 50, "a" * 300, "null", "NaN"])
    if kind == 5:
        return rng.choice(MODELS)
    if kind == 6 and depth < 4:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7 and depth < 4:
        return {rng.choice(KEYS + ["role", "content", "type", "text", "include_usage"]): _value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    if kind == 8:
        return [{"role": rng.choice(["user", "system", "assistant", "developer", "tool", "x"]),
                 "content": rng.choice(["hi", "", [{"type": "text", "text": "yo"}], [{"type": "image"}], 3])}
                for _ in range(rng.randrange(3))]
    if kind == 9:
        return [rng.randrange(-5, 70000) for _ in range(rng.randrange(4))]  # token ids, some out of range
    if kind == 10:
        nested = "x"
        for _ in range(rng.choice([10, 200, 900])):
            nested = [nested]
        return nested
    return rng.choice(["hi", 3, 0.7, ["a", "b"], {"include_usage": True}])


NEAR = {  # values a client might send: valid, at the edges, or just past them
    "temperature": [0, 1e-300, 1e-30, 0.7, 2.0], "top_p": [1e-300, 1e-9, 0.5, 1.0],
    "seed": [0, 12345, 2**63, 2**64 - 1, -(2**63)], "max_tokens": [1, 3, 32],
    "stop": ["\n", ["a", "b"], "x" * 256, "the", ["a", "b", "c", "d"]], "stream": [True, False],
    "ignore_eos": [True, False], "prompt": ["hi", [1, 2, 3], "é ü", "word " * 60, [0]],
    "model": MODELS, "stream_options": [{"include_usage": True}, None], "echo": [False], "n": [1],
}


def _body(rng: random.Random) -> bytes:
    if rng.random() < 0.08:  # not JSON at all, or JSON that is not an object
        return rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "tiny"', b"1e999", b'"x"',
                           b"[" * 5000])
    body = {"model": rng.choice(MODELS[:4]), "prompt": "hi", "max_tokens": rng.choice([1, 2, 3]),
            "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(rng.randrange(1, 5)):
        key = rng.choice(list(NEAR))
        body[key] = rng.choice(NEAR[key])  # mostly plausible: these reach the engine
    if rng.random() < 0.4:
        body[rng.choice(KEYS)] = _value(rng)  # and sometimes anything at all
    if rng.random() < 0.1:
        body.pop(rng.choice(list(body)))
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("fuzz"))


def test_random_bodies_get_4xx_while_good_requests_stream_unchanged(world):
    ref = Reference(world[0], world[1])
    want = {a: ref(a, "The quick brown fox", 24) for a in (None, LORA)}
    model, tok = dt.load_pretrained(world[0])
    limits = Limits(max_prompt_tokens=64, max_tokens=32, max_body_bytes=1 << 16)
    app = build_app(model, tok, world[1], model_name="tiny", limits=limits, max_batch=8, batch_wait_ms=5)
    rng = random.Random(int(os.environ.get("DELTATUNE_FUZZ_SEED", "1234")))  # other seeds explore further
    statuses: dict[int, int] = {}
    failures: list[str] = []
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        good: dict[str | None, str] = {}

        def stream_good(adapter: str | None) -> None:
            model_id = "tiny" if adapter is None else f"tiny:{adapter}"
            for _ in range(3):  # the good requests keep coming while the fuzz runs
                with httpx.Client(base_url=server.url, timeout=60) as c:
                    r = c.post("/v1/completions", json={"model": model_id, "prompt": "The quick brown fox",
                                                       "max_tokens": 24, "temperature": 0})
                    good.setdefault(adapter, r.json()["choices"][0]["text"].strip() if r.status_code == 200
                                    else f"HTTP {r.status_code}: {r.text}")
                    if good[adapter] != want[adapter]:
                        failures.append(f"good request for {model_id} answered {good[adapter]!r}")

        workers = [threading.Thread(target=stream_good, args=(a,)) for a in (None, LORA)]
        for w in workers:
            w.start()
        for i in range(300):
            path = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/adapters/load"])
            raw = _body(rng)
            try:
                r = client.post(path, content=raw, headers={"content-type": "application/json"})
            except httpx.TimeoutException:
                failures.append(f"#{i} {path} {raw[:200]!r}: no answer in 30 s")
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                failures.append(f"#{i} {path} {raw[:200]!r}: {r.status_code} {r.text[:300]}")
            elif r.status_code >= 400 and "error" not in r.json():
                failures.append(f"#{i} {path}: {r.status_code} without an error body")
        for w in workers:
            w.join(120)
        health = client.get("/health").json()
    assert not failures, "\n".join(failures[:10])
    assert health["status"] == "ok"
    assert set(good) == {None, LORA}
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 100  # the fuzz did reach the validation
