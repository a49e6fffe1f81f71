"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (FastAPI + uvicorn).

    app = build_app(model, tokenizer, n_slots=8, model_name="tiny")
    uvicorn.run(app, port=8000)        # or: moe-serve --run runs/tiny --port 8000

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.completions.create(model="tiny", prompt="def ", max_tokens=32, temperature=0)
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])

Endpoints: ``POST /v1/completions`` (OpenAI's legacy completions API), ``POST
/v1/chat/completions`` (messages rendered by the chat template, moe/data/chat.py), ``GET
/v1/models`` (with ``max_model_len``, the context, as vLLM reports it), ``GET /health``, ``GET
/metrics`` (Prometheus text). As in vLLM's OpenAI entrypoint, one engine loop runs the
scheduler in a background thread; every HTTP request (and every prompt of a list, every one
of ``n`` choices) becomes a scheduler request, so concurrent requests share decode steps, and
each handler awaits its tokens through an asyncio queue the loop feeds. ``stream: true``
answers with server-sent events, one chunk per piece of text, then ``data: [DONE]``.

What a request may ask (moe/inference/protocol.py): ``prompt`` as a string, a list of
strings, a list of token ids or a list of such lists (one choice each, ``index`` in order);
``max_tokens`` (default 16 for completions; null: up to the context), ``temperature`` (0:
greedy; below 1e-5 greedy too, as vLLM), ``top_p``, ``top_k`` (vLLM's extension), ``stop``
(up to 4 strings, not returned), ``seed`` (the request's own generator: same seed, same
tokens, whatever else is running; choice i of a prompt list, or of ``n``, draws from seed +
i), ``n`` (prompt-major), ``logprobs`` (top-N, N <= 20) and ``echo`` (the prompt first, with
its tokens' logprobs: what lm-evaluation-harness sends, ``max_tokens`` 0 or 1), ``stream``,
``stream_options.include_usage``, ``user``, vLLM's ``stop_token_ids``, ``ignore_eos`` and
``min_tokens``, and our ``speculative`` (speculative decoding for this request, exact:
``{"method": "ngram" | "draft_model" | "none", "num_speculative_tokens": 4,
"prompt_lookup_max": 3, "prompt_lookup_min": 1}``, vLLM's ``speculative_config`` names;
moe/inference/spec_batch.py); chat takes ``messages``, ``max_completion_tokens``, ``logprobs`` with
``top_logprobs``. Generation also stops at ``<|endoftext|>`` (finish_reason "stop", not in
the text). Refused with a 400: ``best_of`` > 1, ``suffix``, ``logit_bias``, nonzero
penalties, tools, unknown fields, wrong types, a prompt plus ``max_tokens`` longer than the
context. Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
Past ``max_waiting`` waiting requests a new one gets a 429; past ``request_timeout`` seconds
a request is cancelled and answered with a 504 (a stream with an error chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from torch import nn

from moe.data.chat import CHAT_TEMPLATE, render_chat
from moe.inference.engine import Engine
from moe.inference.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from moe.inference.metrics import ServerMetrics
from moe.inference.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionLogprobs,
    CompletionRequest,
    Generation,
    SpeculativeOptions,
    chat_logprobs,
    generation,
    refuse_unsupported,
)
from moe.inference.sampling import SamplingParams
from moe.inference.scheduler import Request, Scheduler
from moe.inference.spec_batch import Speculation

log = logging.getLogger("moe.serve")

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
            st = sched.spec_stats
            self.metrics.speculation(st.target_calls, st.drafted, st.accepted)
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

    def __init__(self, model: nn.Module | Engine, tokenizer, n_slots: int = 8,
                 model_name: str = "moe",
                 max_len: int | None = None, max_waiting: int = 256,
                 chat_template: str = CHAT_TEMPLATE, request_timeout: float | None = None,
                 draft_model: nn.Module | None = None, speculation: Speculation | None = None):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.max_waiting, self.request_timeout = max_waiting, request_timeout
        self.chat_template = chat_template
        self.engine = model if isinstance(model, Engine) else Engine(model, n_slots=n_slots,
                                                                       max_len=max_len)
        draft = None if draft_model is None else Engine(draft_model, n_slots=self.engine.n_slots)
        if speculation is not None and speculation.method == "draft_model" and draft is None:
            raise ValueError("speculation by draft_model needs a draft_model")
        self.speculation = speculation  # the default of requests that do not say
        self.loop = EngineLoop(Scheduler(self.engine, detokenize=tokenizer.decode,
                                         draft=draft))
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    def token_text(self, token: int) -> str:
        """One token decoded alone (a piece of a UTF-8 character decodes to U+FFFD)."""
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    # --- requests --------------------------------------------------------------------------

    def check_model(self, req) -> None:
        if req.model != self.model_name:
            raise APIError(f"The model `{req.model}` does not exist (this server serves "
                           f"`{self.model_name}`)", "model", 404, code="model_not_found")
        refuse_unsupported(req)

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError("prompt: give a string, a list of strings or token ids", "prompt")
        return [self.tokenizer.encode(x) or [self.tokenizer.eot_id] if isinstance(x, str)
                else list(x) for x in prompts]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[list[int]]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(messages, self.chat_template, req.add_generation_prompt,
                               self.tokenizer.eot, self.tokenizer.bos)
        except Exception as e:  # noqa: BLE001 - a template error is this request's
            raise APIError(f"the chat template failed on these messages: {e}",
                           "messages") from None
        return [self.tokenizer.encode(text) or [self.tokenizer.eot_id]]

    def request_speculation(self, opts: SpeculativeOptions | None) -> Speculation | None:
        """A request's ``speculative`` field as the scheduler's Speculation (None: none);
        what it leaves out comes from the server's default of the same method, else from
        ``Speculation``'s defaults."""
        if opts is None:
            return self.speculation
        given = {k: v for k, v in (("num_tokens", opts.num_speculative_tokens),
                                   ("max_ngram", opts.prompt_lookup_max),
                                   ("min_ngram", opts.prompt_lookup_min)) if v is not None}
        if opts.method == "none":
            if given:
                raise APIError("speculative: method 'none' takes no other field", "speculative")
            return None
        if opts.method == "draft_model":
            if self.loop.scheduler.draft is None:
                raise APIError("speculative: this server has no draft model (start it with "
                               "moe-serve --draft RUN), use method 'ngram'", "speculative")
            if "max_ngram" in given or "min_ngram" in given:
                raise APIError("speculative: prompt_lookup_max / prompt_lookup_min are for "
                               "method 'ngram'", "speculative")
        base = self.speculation if self.speculation is not None and \
            self.speculation.method == opts.method else Speculation(opts.method)
        try:
            return dataclasses.replace(base, **given)
        except ValueError as e:
            raise APIError(f"speculative: {e}", "speculative") from None

    def requests(self, gen: Generation) -> list[Request]:
        """Scheduler requests for each prompt and choice, or an APIError saying what is wrong."""
        speculative = self.request_speculation(gen.speculative)
        vocab = self.engine.cfg.vocab_size
        if any(not 0 <= t < vocab for t in gen.stop_token_ids):
            raise APIError(f"stop_token_ids must be token ids in [0, {vocab})", "stop_token_ids")
        stop_tokens = (() if gen.ignore_eos else (self.tokenizer.eot_id,)) + gen.stop_token_ids
        ctx, out = self.engine.max_len, []
        for ids in gen.prompts:
            try:
                ids = self.engine.check_prompt(ids)
            except ValueError as e:
                raise APIError(str(e), "prompt") from None
            max_tokens = ctx - len(ids) if gen.max_tokens is None else gen.max_tokens
            if len(ids) + max_tokens > ctx:
                raise APIError(f"This model's maximum context length is {ctx} tokens. However, "
                               f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in "
                               f"the prompt, {max_tokens} for the completion). Please reduce "
                               "the prompt or max_tokens.", "max_tokens" if
                               len(ids) <= ctx else "prompt")
            try:
                params = SamplingParams(max_new_tokens=max_tokens, temperature=gen.temperature,
                                        top_k=gen.top_k, top_p=gen.top_p,
                                        stop_tokens=stop_tokens, min_tokens=gen.min_tokens)
            except ValueError as e:
                raise APIError(str(e)) from None
            # n choices per prompt, prompt-major (OpenAI's order). Choice i draws from seed + i:
            # identical prompts in one list, and the n choices of one prompt, get their own
            # samples, and a request is still reproduced by its seed.
            for _ in range(gen.n):
                seed = None if gen.seed is None else (gen.seed + len(out)) % 2**64
                out.append(Request(ids, params, seed=seed, stop_strings=gen.stop,
                                   logprobs=gen.logprobs,
                                   prompt_logprobs=gen.echo and gen.logprobs is not None,
                                   speculative=speculative))
        if self.loop.waiting() + len(out) > self.max_waiting:  # back-pressure: refuse, now
            for _ in out:
                self.loop.metrics.requests.labels("rejected").inc()
            raise APIError(f"the server is busy ({self.loop.waiting()} requests waiting, at "
                           f"most {self.max_waiting}): retry later", status=429,
                           kind="rate_limit_error", code="server_busy")
        return out

    async def updates(self, requests: list[Request]) -> AsyncIterator[tuple[int, Update]]:
        """(choice index, update) as the loop makes them; aborts what is left if cancelled,
        and past ``request_timeout`` seconds raises APIError (504)."""
        aio = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        left = set(range(len(requests)))
        deadline = None if self.request_timeout is None else aio.time() + self.request_timeout
        for i, r in enumerate(requests):
            self.loop.submit(r, lambda u, i=i: aio.call_soon_threadsafe(q.put_nowait, (i, u)))
        try:
            while left:
                try:
                    i, u = await asyncio.wait_for(
                        q.get(), None if deadline is None else max(0.0, deadline - aio.time()))
                except TimeoutError:
                    raise APIError(f"the request took longer than the server's limit of "
                                   f"{self.request_timeout:g} s (moe-serve --request-timeout)",
                                   status=504, kind="timeout_error",
                                   code="request_timeout") from None
                if u.finish_reason is not None or u.error is not None:
                    left.discard(i)
                yield i, u
        finally:
            for i in left:
                self.loop.abort(requests[i])

    # --- responses -------------------------------------------------------------------------

    def _head(self, rid: str, kind: str) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name}

    def _prompt_entries(self, r: Request) -> list:
        """The echoed prompt's logprob entries: its first token bare, the rest scored."""
        return [r.prompt[0], *r.prompt_token_logprobs]

    async def complete(self, req: CompletionRequest | ChatCompletionRequest,
                       gen: Generation) -> dict:
        requests = self.requests(gen)
        final: dict[int, Update] = {}
        async for i, u in self.updates(requests):
            if u.error is not None:
                raise APIError(f"generation failed: {u.error}", status=500, kind="server_error")
            if u.finish_reason is not None:
                final[i] = u
        chat = isinstance(req, ChatCompletionRequest)
        choices = []
        for i, r in enumerate(requests):
            u = final[i]
            choice = {"index": i, "logprobs": None, "finish_reason": u.finish_reason}
            made = r.token_logprobs[:u.n_tokens]
            if chat:
                choice["message"] = {"role": "assistant", "content": u.text}
                if gen.logprobs is not None:
                    choice["logprobs"] = chat_logprobs(made, self.token_text)
            else:
                prompt_text = self.tokenizer.decode(r.prompt) if gen.echo else ""
                choice["text"] = prompt_text + u.text
                if gen.logprobs is not None:
                    entries = (self._prompt_entries(r) if gen.echo else []) + made
                    choice["logprobs"] = CompletionLogprobs(self.token_text).take(entries)
            choices.append(choice)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return {**self._head(rid, "chat.completion" if chat else "text_completion"),
                "choices": choices, "usage": _usage(requests, final, gen.n)}

    async def stream(self, req: CompletionRequest | ChatCompletionRequest, gen: Generation,
                     requests: list[Request]) -> AsyncIterator[str]:
        """SSE lines for ``requests`` (of ``req``). Text is held back while it might still
        become a stop string (its last len(longest stop) - 1 characters) or ends in an
        incomplete UTF-8 character; a chunk's logprobs cover the tokens made since the last
        chunk (their text may lag a held-back piece, never lead the whole)."""
        chat = isinstance(req, ChatCompletionRequest)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = self._head(rid, "chat.completion.chunk" if chat else "text_completion")
        hold = max((len(s) for s in gen.stop), default=1) - 1
        sent, scored = [0] * len(requests), [0] * len(requests)
        builders = [CompletionLogprobs(self.token_text) for _ in requests]
        final: dict[int, Update] = {}

        def chunk(i: int, text: str, finish: str | None, entries: list | None,
                  first: bool = False) -> str:
            choice: dict = {"index": i, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = ({"role": "assistant", "content": text} if first
                                   else {"content": text} if text or finish is None else {})
                if entries is not None:
                    choice["logprobs"] = chat_logprobs(entries, self.token_text)
            else:
                choice["text"] = text
                if entries is not None:
                    choice["logprobs"] = builders[i].take(entries)
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        for i, r in enumerate(requests):  # what comes before any token
            if chat:
                yield chunk(i, "", None, None, first=True)
            elif gen.echo:
                entries = self._prompt_entries(r) if gen.logprobs is not None else None
                # Prompt logprobs are made in the prefill: wait for them with the first token.
                if entries is None:
                    yield chunk(i, self.tokenizer.decode(r.prompt), None, None)
        echoed: set[int] = set()
        updates = self.updates(requests)
        while True:
            try:
                i, u = await anext(updates)
            except StopAsyncIteration:
                break
            except APIError as e:  # the headers are sent: an error event ends the stream
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            r = requests[i]
            if u.error is not None:
                err = APIError(f"generation failed: {u.error}", status=500, kind="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            if not chat and gen.echo and gen.logprobs is not None and i not in echoed:
                echoed.add(i)
                yield chunk(i, self.tokenizer.decode(r.prompt), None, self._prompt_entries(r))
            if u.finish_reason is None:
                safe = u.text.rstrip("\ufffd")
                safe = safe[:max(0, len(safe) - hold)]
            else:
                safe, final[i] = u.text, u
            if len(safe) > sent[i] or u.finish_reason is not None:
                delta, sent[i] = safe[sent[i]:], max(sent[i], len(safe))
                entries = None
                if gen.logprobs is not None:
                    entries, scored[i] = r.token_logprobs[scored[i]:u.n_tokens], u.n_tokens
                yield chunk(i, delta, u.finish_reason, entries)
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = {**head, "choices": [], "usage": _usage(requests, final, gen.n)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"


def _usage(requests: list[Request], final: dict[int, Update], n: int) -> dict:
    """OpenAI's usage: each prompt's tokens once (not once per choice), every choice's."""
    prompt = sum(len(r.prompt) for r in requests[::n])
    done = sum(u.n_tokens for u in final.values())
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def build_app(model: nn.Module | Engine, tokenizer, n_slots: int = 8, model_name: str = "moe",
              max_len: int | None = None, max_waiting: int = 256,
              chat_template: str = CHAT_TEMPLATE, request_timeout: float | None = None,
              draft_model: nn.Module | None = None, speculation: Speculation | None = None
              ) -> FastAPI:
    """The FastAPI app serving ``model`` (a ``Transformer``) with ``tokenizer`` (a
    ``BPETokenizer``: encode, decode, eot_id) on ``n_slots`` cache slots; ``model`` may be an
    ``Engine`` already built (its own slots and context: rank 0's ``DistributedEngine`` under
    torchrun, moe/inference/distributed.py). The engine loop starts and stops with the app's
    lifespan; ``app.state.server`` is the CompletionServer. ``draft_model``: a small model
    (same vocabulary) with its own cache slots, for requests speculating by "draft_model";
    ``speculation``: what requests that do not say use (None: no speculation unless a request
    asks; moe/inference/spec_batch.py)."""
    server = CompletionServer(model, tokenizer, n_slots, model_name, max_len, max_waiting,
                              chat_template, request_timeout, draft_model, speculation)

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

    async def respond(req, prompts: list[list[int]], http: HTTPRequest):
        gen = generation(req, prompts)
        if not req.stream:
            return JSONResponse(await _unless_disconnected(server.complete(req, gen), http))
        requests = server.requests(gen)  # a bad request is refused before streaming starts
        return StreamingResponse(server.stream(req, gen, requests),
                                 media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: HTTPRequest):
        server.check_model(req)
        return await respond(req, server.completion_prompts(req), http)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: HTTPRequest):
        server.check_model(req)
        return await respond(req, server.chat_prompt(req), http)

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
