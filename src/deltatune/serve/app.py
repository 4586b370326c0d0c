"""The HTTP face of the engine: an OpenAI-compatible FastAPI app.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming as server-sent events or not), ``GET
/v1/models``, ``POST /v1/adapters/load`` and ``/unload``, ``GET /health`` and ``GET /metrics``. ``model`` is
``BASE``, ``BASE:ADAPTER`` (vLLM / LoRAX) or a bare adapter name. With an API key set, every ``/v1`` route and
``/metrics`` need ``Authorization: Bearer KEY``; ``/health`` stays open.

Handlers only validate, tokenize and wait: the engine's worker thread runs the model and reports through an
``asyncio.Queue`` per request. A client that goes away (mid-stream, or while waiting for a whole answer) cancels
its request, and its row leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import schemas as S
from .adapter_cache import AdapterError
from .engine import Engine
from .rows import Event, GenRequest
from .schemas import APIError

_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters/load", "/v1/adapters/unload",
           "/health", "/metrics"}


@dataclass
class Limits:
    """What a request may be: its size (400/413 beyond), which web pages may send it, how many may wait (429).

    ``allowed_origins``: browser origins (``https://app.example``) allowed to call the server. A request carrying
    any other ``Origin`` header is refused (403): a web page the user visits must not drive a server on their
    machine (``text/plain`` POSTs need no CORS preflight). Non-browser clients send no ``Origin``.
    ``allowed_hosts``: the names a request's ``Host`` header may give (403 otherwise): a loopback server answers
    only to its own names, so a page whose domain was re-pointed at 127.0.0.1 (DNS rebinding) cannot read it.
    """

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    allowed_origins: tuple[str, ...] = ()
    max_waiting: int = 64  # requests waiting for a place in the batch; beyond, 429 with Retry-After
    allowed_hosts: tuple[str, ...] | None = None  # Host header names served (None: any); loopback servers set theirs


def _hostname(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Limited:
    """ASGI middleware, before any handler: refuses a browser ``Origin`` not allowed (403), reads the body up front
    and answers 413 beyond ``limit`` bytes, refuses a POST body that is not declared JSON (415); counts requests."""

    def __init__(self, app, limit: int, metrics, origins: tuple[str, ...] = (), hosts: tuple[str, ...] | None = None):
        self.app, self.limit, self.metrics, self.origins = app, limit, metrics, set(origins)
        self.hosts = None if hosts is None else {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in _ROUTES else "other"
        status = [0]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            host = _hostname(headers.get(b"host", b"").decode("latin-1"))
            if self.hosts is not None and host not in self.hosts:
                err = APIError(403, f"this server does not answer to the host name {host!r} (a page whose domain "
                                    f"points at this machine?); it answers to {sorted(self.hosts)}",
                               code="host_not_allowed")
                await JSONResponse(err.body(), status_code=403)(scope, receive, counted_send)
                return
            origin = headers.get(b"origin", b"").decode("latin-1")
            if origin and origin not in self.origins:
                err = APIError(403, f"requests from the web page {origin} are refused (a page a user visits must not "
                                    f"drive this server); to allow it, start the server with --allow-origin {origin}",
                               code="origin_not_allowed")
                await JSONResponse(err.body(), status_code=403)(scope, receive, counted_send)
                return
            body = await self._read(scope, receive)
            if body is None:
                err = APIError(413, f"request body larger than the limit of {self.limit} bytes",
                               code="request_too_large")
                await JSONResponse(err.body(), status_code=413)(scope, receive, counted_send)
                return
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if scope["method"] == "POST" and ctype != b"application/json":
                err = APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                                    f"(got {ctype.decode('latin-1') or 'none'})", code="unsupported_media_type")
                await JSONResponse(err.body(), status_code=415)(scope, receive, counted_send)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counted_send)
        finally:
            self.metrics.requests.inc(endpoint=endpoint, status=str(status[0] or 499))

    async def _read(self, scope, receive) -> bytes | None:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, limits: Limits | None = None,
               context: int | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``'s model as ``model_name``; starts and stops the engine with the app.

    ``context``: the model's context length (prompt + output tokens), when it has one.
    """
    limits = limits or Limits()
    registry, tok, metrics = engine.registry, engine.tok, engine.metrics
    metrics.gauge("deltatune_adapters_loaded", "Adapters loaded now.", lambda: len(registry.loaded()))
    metrics.gauge("deltatune_adapter_bytes", "Bytes of loaded adapter tensors.", lambda: registry.loaded_bytes)
    metrics.gauge("deltatune_adapter_evictions", "Adapters evicted from the cache so far.", lambda: registry.evictions)
    metrics.gauge("deltatune_running_requests", "Requests in the running batch.", lambda: len(engine.rows))
    metrics.gauge("deltatune_waiting_requests", "Requests waiting to join the batch.", lambda: engine.waiting)

    # tokenising a long prompt or a chat template takes up to a second: off the event loop, so /health and the
    # streams keep answering; one thread, so the tokenizer is never entered twice at once
    tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltatune-tokenize")

    async def off_loop(fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, functools.partial(fn, *args, **kwargs))

    async def lifespan(_app):
        # the model, tokenizer and libraries are hundreds of thousands of long-lived objects: frozen out of the
        # cyclic collector, whose full passes over them would otherwise stall every thread (GIL) for ~200 ms
        gc.collect()
        gc.freeze()
        engine.start()
        yield
        engine.stop()
        tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="deltatune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Limited, limit=limits.max_body_bytes, metrics=metrics, origins=limits.allowed_origins,
                       hosts=limits.allowed_hosts)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(dependencies=[Depends(authorize)])

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "engine stopped", "model": model_name,
                "adapters_loaded": len(registry.loaded()), "running": len(engine.rows), "waiting": engine.waiting}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @v1.get("/v1/models")
    async def models():
        loaded = registry.loaded()
        base = {"id": model_name, "object": "model", "created": 0, "owned_by": "deltatune", "root": model_name,
                "parent": None}
        return {"object": "list", "data": [base] + [
            {"id": f"{model_name}:{n}", "object": "model", "created": 0, "owned_by": "deltatune", "root": n,
             "parent": model_name, "loaded": n in loaded} for n in registry.available()]}

    @v1.post("/v1/adapters/load")
    async def load(request: Request):
        body = await _parse(request, S.AdapterRequest)
        return await _admin(lambda: registry.load(body.name))

    @v1.post("/v1/adapters/unload")
    async def unload(request: Request):
        body = await _parse(request, S.AdapterRequest)
        return await _admin(lambda: registry.unload(body.name))

    async def _admin(fn):
        try:
            return await asyncio.wrap_future(engine.call(fn))
        except AdapterError as e:
            raise APIError(e.status, str(e), code=e.code, param="name") from None

    def resolve(model: str) -> str | None:
        if model == model_name:
            return None
        name = model[len(model_name) + 1:] if model.startswith(model_name + ":") else model
        try:
            registry.folder(name)
        except AdapterError as e:
            if name is model:  # neither the base nor BASE:ADAPTER nor a known adapter name
                raise APIError(404, f"model {model!r} not found: use {model_name!r} or '{model_name}:ADAPTER' "
                                    f"(GET /v1/models lists them)", code="model_not_found", param="model") from None
            raise APIError(e.status, str(e), code=e.code, param="model") from None
        return name

    def prompt_ids(body: S._Generation, text: str | list[int]) -> tuple[list[int], int]:
        """Token ids of the prompt and the max_tokens to use, checked against the limits."""
        ids = list(text) if isinstance(text, list) else tok(text, add_special_tokens=False)["input_ids"]
        if isinstance(text, list) and any(not 0 <= t < len(tok) for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {len(tok)})", param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", param="prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                                f"{limits.max_prompt_tokens}", code="context_length_exceeded", param="prompt")
        room = limits.max_tokens if context is None else min(limits.max_tokens, context - len(ids))
        asked = body.limit if isinstance(body, S.ChatRequest) else body.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"max_tokens={asked} is more than this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({asked}) exceed the model's "
                                f"context of {context} tokens", code="context_length_exceeded", param="max_tokens")
        default = 16 if isinstance(body, S.CompletionRequest) else room  # OpenAI's defaults
        return ids, asked or default

    def not_too_busy() -> None:
        """Backpressure: a bounded wait for a place in the batch, beyond which clients are told to come back."""
        if engine.waiting >= limits.max_waiting:
            raise APIError(429, f"{engine.waiting} requests are already waiting for a place in the batch (this "
                                f"server's limit: {limits.max_waiting}); retry shortly", code="server_busy",
                           headers={"Retry-After": "1"})

    @v1.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, S.CompletionRequest)
        body.check_supported()
        adapter = resolve(body.model)
        not_too_busy()
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        ids, max_tokens = await off_loop(prompt_ids, body, prompt)
        return await _generate(request, body, adapter, ids, max_tokens, chat=False)

    @v1.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, S.ChatRequest)
        body.check_supported()
        adapter = resolve(body.model)
        if getattr(tok, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        not_too_busy()
        text = await off_loop(tok.apply_chat_template, body.chat(), tokenize=False, add_generation_prompt=True)
        ids, max_tokens = await off_loop(prompt_ids, body, text)
        return await _generate(request, body, adapter, ids, max_tokens, chat=True)

    async def _generate(request: Request, body: S._Generation, adapter: str | None, ids: list[int],
                        max_tokens: int, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        req = GenRequest(ids, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), adapter=adapter,
                         max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stops,
                         seed=body.seed, stream=body.stream, ignore_eos=body.ignore_eos)
        engine.submit(req)
        try:
            first = await _next(events, request)  # "start" once admitted, or an error (e.g. a bad adapter file)
            if first.kind == "error":
                raise APIError(first.status, first.text, code=first.code)
            rid = S.new_id("chatcmpl" if chat else "cmpl")
            if body.stream:
                usage = body.stream_options is not None and body.stream_options.include_usage
                return StreamingResponse(_stream(events, request, req, rid, body.model, chat, usage),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            while (ev := await _next(events, request)).kind == "text":
                pass
        except _Gone:
            req.cancelled = True
            return Response(status_code=499)
        except BaseException:
            req.cancelled = True
            raise
        if ev.kind == "error":
            raise APIError(ev.status, ev.text, code=ev.code)
        build = S.chat if chat else S.completion
        return build(rid, body.model, ev.text, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)

    async def _stream(events: asyncio.Queue, request: Request, req: GenRequest, rid: str, model: str, chat: bool,
                      usage: bool) -> AsyncIterator[str]:
        try:
            if chat:
                yield _sse(S.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            while True:
                ev = await _next(events, request)  # the server may not notice a gone client from its sends
                if ev.kind == "text":
                    yield _sse(S.chat_chunk(rid, model, {"content": ev.text}) if chat
                               else S.completion_chunk(rid, model, ev.text))
                elif ev.kind == "done":
                    yield _sse(S.chat_chunk(rid, model, {}, ev.finish_reason) if chat
                               else S.completion_chunk(rid, model, "", ev.finish_reason))
                    if usage:
                        obj = "chat.completion.chunk" if chat else "text_completion"
                        yield _sse(S.usage_chunk(rid, model, obj, ev.prompt_tokens, ev.completion_tokens))
                    break
                else:
                    yield _sse(APIError(ev.status, ev.text, code=ev.code).body())
                    break
            yield "data: [DONE]\n\n"
        except _Gone:
            pass
        finally:
            req.cancelled = True  # no effect once finished; frees the row when the client went away

    app.include_router(v1)
    return app


class _Gone(Exception):
    """The client disconnected."""


async def _next(events: asyncio.Queue, request: Request, poll: float = 0.25) -> Event:
    """The next event; raises _Gone if the client disconnected. Checked every ``poll`` seconds, also while events
    keep coming: a fast decoder must not generate a whole answer for a client that left."""
    while True:
        now, last = time.monotonic(), getattr(request.state, "disconnect_checked", None)
        if last is None:
            request.state.disconnect_checked = now
        elif now - last >= poll:
            if await request.is_disconnected():
                raise _Gone()
            request.state.disconnect_checked = now
        try:
            return await asyncio.wait_for(events.get(), poll)
        except asyncio.TimeoutError:
            pass  # a whole poll went by: the check above runs now


async def _parse(request: Request, model: type[BaseModel]):
    try:
        data = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{where}: {err['msg']}" + (f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1
                                                          else ""), param=where or None) from None


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
