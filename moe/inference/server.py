"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (FastAPI + uvicorn).

    app = build_app(model, tokenizer, n_slots=8, model_name="tiny")
    uvicorn.run(app, port=8000)        # or: moe-serve --run runs/tiny --port 8000

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.completions.create(model="tiny", prompt="def ", max_tokens=32, temperature=0)

Endpoints: ``POST /v1/completions`` (OpenAI's legacy completions API), ``GET /v1/models``,
``GET /health``. As in vLLM's OpenAI entrypoint, one engine loop runs the scheduler in a
background thread; every HTTP request (and every prompt of a list) becomes a scheduler request,
so concurrent requests share decode steps, and each handler awaits its tokens through an
asyncio queue the loop feeds. ``stream: true`` answers with server-sent events, one
``text_completion`` chunk per piece of text, then ``data: [DONE]``.

What a request may ask (``CompletionRequest``): ``prompt`` as a string, a list of strings, a
list of token ids or a list of such lists (one choice each, ``index`` in order); ``max_tokens``
(default 16; null: up to the context), ``temperature`` (0: greedy), ``top_p``, ``top_k`` (an
extension, as vLLM's), ``stop`` (up to 4 strings, not returned), ``seed`` (the request's own
generator: same seed, same tokens, whatever else is running; choice i of a prompt list draws
from seed + i), ``temperature`` / ``top_p`` / ``top_k`` / ``n`` null (the default), a
temperature below 1e-5 (greedy, as vLLM), ``stream``, ``stream_options.include_usage``,
``user``. Generation also stops at ``<|endoftext|>`` (finish_reason "stop", not returned). ``n``
choices per prompt (prompt-major, decoded together in the batch); vLLM's ``stop_token_ids``,
``ignore_eos`` and ``min_tokens``. Refused with a 400: ``best_of`` > 1, ``echo``, ``logprobs``,
``suffix``, ``logit_bias``, nonzero penalties, unknown fields, wrong types, a prompt plus
``max_tokens`` longer than the context. Errors have OpenAI's shape: ``{"error": {"message",
"type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from torch import nn

from moe.inference.engine import Engine
from moe.inference.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from moe.inference.metrics import ServerMetrics
from moe.inference.sampling import SamplingParams
from moe.inference.scheduler import Request, Scheduler

log = logging.getLogger("moe.serve")

# --- protocol --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


def _null_is(default):
    return BeforeValidator(lambda v: default if v is None else v)


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields (strict types, unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    # null is the default, as OpenAI's API takes it (lm-eval and other clients send nulls).
    temperature: Annotated[float, _null_is(1.0)] = Field(1.0, ge=0, le=2)
    top_p: Annotated[float, _null_is(1.0)] = Field(1.0, gt=0, le=1)
    top_k: Annotated[int, _null_is(0)] = Field(0, ge=0)  # extension (vLLM's): 0 keeps all
    n: Annotated[int, _null_is(1)] = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # torch.Generator's range
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM's extensions: more stop tokens, no stop at <|endoftext|>, no stop before n tokens.
    stop_token_ids: list[int] | None = None
    ignore_eos: Annotated[bool, _null_is(False)] = False
    min_tokens: Annotated[int, _null_is(0)] = Field(0, ge=0)


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = (
            message, param, status, kind, code)

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}}, self.status)


def _refuse_unsupported(req: CompletionRequest) -> None:
    unsupported = [("best_of", req.best_of not in (None, 1), "best_of > 1 is not supported"),
                   ("echo", req.echo, "echo is not supported"),
                   ("logprobs", req.logprobs is not None, "logprobs are not supported"),
                   ("suffix", req.suffix is not None, "suffix is not supported"),
                   ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
                   ("presence_penalty", req.presence_penalty != 0, "penalties are not supported"),
                   ("frequency_penalty", req.frequency_penalty != 0,
                    "penalties are not supported"),
                   ("stream_options", req.stream_options is not None and not req.stream,
                    "stream_options is only allowed with stream: true")]
    for param, bad, why in unsupported:
        if bad:
            raise APIError(why, param)


# --- the engine loop -------------------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    """What the loop tells a handler after a step: a snapshot of its request."""

    n_tokens: int
    text: str
    finish_reason: str | None
    error: str | None = None


class EngineLoop:
    """The scheduler in one background thread; handlers reach it through a thread-safe inbox."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.steps = 0
        self._outstanding = 0  # submitted and not yet ended (handlers add, the loop ends)
        self._lock = threading.Lock()
        self.metrics = ServerMetrics(self.waiting, lambda: len(self.scheduler.running))

    def waiting(self) -> int:
        """Requests submitted and not yet in a slot (the inbox and the scheduler's queue)."""
        with self._lock:
            return max(0, self._outstanding - len(self.scheduler.running))

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="moe-engine-loop", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.inbox.put(None)
            self.thread.join()
            self.thread = None

    def submit(self, request: Request, notify: Callable[[Update], None]) -> None:
        """Queue ``request``; ``notify(update)`` is called from the loop's thread after each
        step that changed it, the last time with a finish_reason or an error."""
        with self._lock:
            self._outstanding += 1
        self.inbox.put(("add", request, notify))

    def _ended(self, r: Request, outcome: str) -> None:
        with self._lock:
            self._outstanding -= 1
        self.metrics.finished(outcome, len(r.prompt), len(r.tokens))

    def abort(self, request: Request) -> None:
        self.inbox.put(("abort", request, None))

    def _run(self) -> None:
        notify: dict[Request, Callable[[Update], None]] = {}
        sched = self.scheduler
        while True:
            block = not sched.has_work  # idle: sleep until a request arrives
            while True:
                try:
                    item = self.inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is None:
                    return
                kind, r, cb = item
                if kind == "add":
                    try:
                        sched.submit(r)
                    except ValueError as e:  # handlers check first: a last safeguard
                        self._ended(r, "error")
                        _call(cb, Update(0, "", None, error=str(e)))
                        continue
                    if r.finished:  # max_tokens 0: done at once, no step involved
                        self._ended(r, r.finish_reason)
                        _call(cb, Update(0, r.text, r.finish_reason))
                    else:
                        notify[r] = cb
                elif r in notify:
                    sched.abort(r)
                    del notify[r]
                    self._ended(r, "aborted")
            if not sched.has_work:
                continue
            t0 = time.perf_counter()
            try:
                changed = sched.step()
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                log.exception("engine step failed")
                for r in sched.drop_running():
                    self._ended(r, "error")
                    cb = notify.pop(r, None)
                    if cb is not None:
                        _call(cb, Update(len(r.tokens), r.text, None,
                                         error=f"{type(e).__name__}: {e}"))
                continue
            self.metrics.step_seconds.observe(time.perf_counter() - t0)
            self.steps += 1
            for r in changed:
                if r.finished:
                    self._ended(r, "error" if r.error is not None else r.finish_reason)
                cb = notify.pop(r, None) if r.finished else notify.get(r)
                if cb is None:
                    continue
                if r.error is not None:  # this request alone failed; the step went on
                    _call(cb, Update(len(r.tokens), r.text, None, error=r.error))
                else:
                    _call(cb, Update(len(r.tokens), r.text, r.finish_reason))


async def _unless_disconnected(work, http: HTTPRequest, poll_s: float = 0.1):
    """Await ``work`` unless the client goes away first: then cancel it, which aborts its
    requests (``CompletionServer.updates``), so no slot decodes for nobody. (A stream notices
    its client's departure by itself: the next write fails.)"""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise APIError("the client disconnected", status=499, kind="client_closed")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _call(notify: Callable[[Update], None], update: Update) -> None:
    try:
        notify(update)
    except RuntimeError:  # the handler's event loop has closed (shutting down): nobody listens
        pass


# --- the app ---------------------------------------------------------------------------------


class CompletionServer:
    """Request checking, scheduling and response shaping for one model."""

    def __init__(self, model: nn.Module, tokenizer, n_slots: int = 8, model_name: str = "moe",
                 max_len: int | None = None, max_waiting: int = 256):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.max_waiting = max_waiting
        self.engine = Engine(model, n_slots=n_slots, max_len=max_len)
        self.loop = EngineLoop(Scheduler(self.engine, detokenize=tokenizer.decode))
        self.created = int(time.time())

    def requests(self, req: CompletionRequest) -> list[Request]:
        """Scheduler requests for each prompt, or an APIError saying what is wrong."""
        if req.model != self.model_name:
            raise APIError(f"The model `{req.model}` does not exist (this server serves "
                           f"`{self.model_name}`)", "model", 404, code="model_not_found")
        _refuse_unsupported(req)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError("stop: give at most 4 non-empty strings", "stop")
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError("prompt: give a string, a list of strings or token ids", "prompt")
        vocab = self.engine.cfg.vocab_size
        extra_stops = tuple(req.stop_token_ids or ())
        if any(not 0 <= t < vocab for t in extra_stops):
            raise APIError(f"stop_token_ids must be token ids in [0, {vocab})", "stop_token_ids")
        stop_tokens = (() if req.ignore_eos else (self.tokenizer.eot_id,)) + extra_stops
        ctx, out = self.engine.max_len, []
        for prompt in prompts:
            ids = (self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]
                   if isinstance(prompt, str) else list(prompt))
            try:
                ids = self.engine.check_prompt(ids)
            except ValueError as e:
                raise APIError(str(e), "prompt") from None
            max_tokens = ctx - len(ids) if req.max_tokens is None else req.max_tokens
            if len(ids) + max_tokens > ctx:
                raise APIError(f"This model's maximum context length is {ctx} tokens. However, "
                               f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in "
                               f"the prompt, {max_tokens} for the completion). Please reduce "
                               "the prompt or max_tokens.", "max_tokens" if
                               len(ids) <= ctx else "prompt")
            try:
                params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature,
                                        top_k=req.top_k, top_p=req.top_p,
                                        stop_tokens=stop_tokens, min_tokens=req.min_tokens)
            except ValueError as e:
                raise APIError(str(e)) from None
            # n choices per prompt, prompt-major (OpenAI's order). Choice i draws from seed + i:
            # identical prompts in one list, and the n choices of one prompt, get their own
            # samples, and a request is still reproduced by its seed.
            for _ in range(req.n):
                seed = None if req.seed is None else (req.seed + len(out)) % 2**64
                out.append(Request(ids, params, seed=seed, stop_strings=tuple(stops)))
        if self.loop.waiting() + len(out) > self.max_waiting:  # back-pressure: refuse, now
            for _ in out:
                self.loop.metrics.requests.labels("rejected").inc()
            raise APIError(f"the server is busy ({self.loop.waiting()} requests waiting, at "
                           f"most {self.max_waiting}): retry later", status=429,
                           kind="rate_limit_error", code="server_busy")
        return out

    async def updates(self, requests: list[Request]) -> AsyncIterator[tuple[int, Update]]:
        """(choice index, update) as the loop makes them; aborts what is left if cancelled."""
        aio = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        left = set(range(len(requests)))
        for i, r in enumerate(requests):
            self.loop.submit(r, lambda u, i=i: aio.call_soon_threadsafe(q.put_nowait, (i, u)))
        try:
            while left:
                i, u = await q.get()
                if u.finish_reason is not None or u.error is not None:
                    left.discard(i)
                yield i, u
        finally:
            for i in left:
                self.loop.abort(requests[i])

    def chunk(self, rid: str, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": rid, "object": "text_completion", "created": int(time.time()),
               "model": self.model_name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    async def complete(self, req: CompletionRequest) -> dict:
        requests = self.requests(req)
        final: dict[int, Update] = {}
        async for i, u in self.updates(requests):
            if u.error is not None:
                raise APIError(f"generation failed: {u.error}", status=500, kind="server_error")
            if u.finish_reason is not None:
                final[i] = u
        choices = [{"index": i, "text": final[i].text, "logprobs": None,
                    "finish_reason": final[i].finish_reason} for i in range(len(requests))]
        return self.chunk(f"cmpl-{uuid.uuid4().hex}", choices, _usage(requests, final, req.n))

    async def stream(self, req: CompletionRequest, requests: list[Request]
                     ) -> AsyncIterator[str]:
        """SSE lines for ``requests`` (of ``req``). Text is held back while it might still
        become a stop string (its last len(longest stop) - 1 characters) or ends in an
        incomplete UTF-8 character."""
        rid = f"cmpl-{uuid.uuid4().hex}"
        hold = max((len(s) for s in requests[0].stop_strings), default=1) - 1
        sent = [0] * len(requests)
        final: dict[int, Update] = {}
        async for i, u in self.updates(requests):
            if u.error is not None:
                err = {"message": f"generation failed: {u.error}", "type": "server_error",
                       "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                return
            if u.finish_reason is None:
                safe = u.text.rstrip("\ufffd")
                safe = safe[:max(0, len(safe) - hold)]
            else:
                safe, final[i] = u.text, u
            if len(safe) > sent[i] or u.finish_reason is not None:
                delta, sent[i] = safe[sent[i]:], max(sent[i], len(safe))
                choice = {"index": i, "text": delta, "logprobs": None,
                          "finish_reason": u.finish_reason}
                yield f"data: {json.dumps(self.chunk(rid, [choice]))}\n\n"
        if req.stream_options is not None and req.stream_options.include_usage:
            yield f"data: {json.dumps(self.chunk(rid, [], _usage(requests, final, req.n)))}\n\n"
        yield "data: [DONE]\n\n"


def _usage(requests: list[Request], final: dict[int, Update], n: int) -> dict:
    """OpenAI's usage: each prompt's tokens once (not once per choice), every choice's."""
    prompt = sum(len(r.prompt) for r in requests[::n])
    done = sum(u.n_tokens for u in final.values())
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def build_app(model: nn.Module, tokenizer, n_slots: int = 8, model_name: str = "moe",
              max_len: int | None = None, max_waiting: int = 256) -> FastAPI:
    """The FastAPI app serving ``model`` (a ``Transformer``) with ``tokenizer`` (a
    ``BPETokenizer``: encode, decode, eot_id) on ``n_slots`` cache slots. The engine loop
    starts and stops with the app's lifespan; ``app.state.server`` is the CompletionServer."""
    server = CompletionServer(model, tokenizer, n_slots, model_name, max_len, max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="moe", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errors = e.errors()
        parts, param = [], None
        for err in errors:
            if err.get("type") == "json_invalid":  # its loc is a character position, no field
                parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error')} "
                             f"at character {err.get('loc', ('', '?'))[-1]})")
                continue
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = param or (loc[0] if loc else None)
            what = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg")
            parts.append(f"{'.'.join(loc) or 'body'}: {what}")
        return APIError("; ".join(parts) or "invalid request", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return APIError(str(e.detail), status=e.status_code).response()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: HTTPRequest):
        if not req.stream:
            return JSONResponse(await _unless_disconnected(server.complete(req), http))
        requests = server.requests(req)  # a bad request is refused before streaming starts
        return StreamingResponse(server.stream(req, requests), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        card = {"id": server.model_name, "object": "model", "created": server.created,
                "owned_by": "moe", "max_model_len": server.engine.max_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": server.engine.n_slots, "steps": server.loop.steps}

    @app.get("/metrics")
    async def metrics():
        return Response(server.loop.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app

