"""What the server speaks: OpenAI's request bodies (checked), its error shape, and its logprobs.

Two endpoints share one path: ``CompletionRequest`` (``/v1/completions``, a prompt) and
``ChatCompletionRequest`` (``/v1/chat/completions``, messages rendered by the chat template)
both become a ``Generation``: token-id prompts plus what to sample and what to report, which
``moe.inference.server`` turns into scheduler requests. Types are strict and unknown fields
refused, so a client's typo gets a 400 naming it rather than a silent default; ``null`` for
``temperature``, ``top_p``, ``top_k`` or ``n`` means the default, as OpenAI's API takes it
(lm-eval and other clients send nulls).

Log-probabilities are the model's own (log_softmax of the raw logits in fp32, before
temperature, top-k/top-p and min_tokens; vLLM's default), one entry per token generated, a
final stop token included (its text is not in the choice's ``text``). The legacy completions
shape is ``tokens`` (each token decoded alone), ``token_logprobs``, ``top_logprobs`` (the
``logprobs`` most likely tokens and the chosen one: up to ``logprobs`` + 1 entries, as OpenAI
documents) and ``text_offset`` (where each token's text starts in the choice's ``text``,
counted over the tokens' own texts). With ``echo`` the prompt's tokens come first, the first
with ``null`` log-probability and top list (nothing predicts it): what lm-evaluation-harness
reads a loglikelihood from. The chat shape is ``{"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}]}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from moe.inference.sampling import TokenLogprob
from moe.inference.spec_batch import MAX_SPECULATIVE_TOKENS

MAX_LOGPROBS = 20  # top tokens a request may ask for (vLLM's default max_logprobs)


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = (
            message, param, status, kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status)


def _null_is(default):
    return BeforeValidator(lambda v: default if v is None else v)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SpeculativeOptions(BaseModel):
    """The ``speculative`` extension field: speculative decoding for this request, in the
    names of vLLM's ``speculative_config`` ("ngram": prompt lookup; "draft_model": the
    server's ``--draft``; "none": off even where the server speculates by default)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    method: Literal["ngram", "draft_model", "none"]
    num_speculative_tokens: int | None = Field(None, ge=1, le=MAX_SPECULATIVE_TOKENS)
    prompt_lookup_max: int | None = Field(None, ge=1)
    prompt_lookup_min: int | None = Field(None, ge=1)


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    temperature: Annotated[float, _null_is(1.0)] = Field(1.0, ge=0, le=2)
    top_p: Annotated[float, _null_is(1.0)] = Field(1.0, gt=0, le=1)
    top_k: Annotated[int, _null_is(0)] = Field(0, ge=0)  # extension (vLLM's): 0 keeps all
    n: Annotated[int, _null_is(1)] = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # torch.Generator's range
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM's extensions: more stop tokens, no stop at <|endoftext|>, no stop before n tokens.
    stop_token_ids: list[int] | None = None
    ignore_eos: Annotated[bool, _null_is(False)] = False
    min_tokens: Annotated[int, _null_is(0)] = Field(0, ge=0)
    # Our extension (moe/inference/spec_batch.py); null: the server's default.
    speculative: SpeculativeOptions | None = None


class CompletionRequest(_Sampling):
    """The body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    best_of: int | None = Field(None, ge=1)
    echo: Annotated[bool, _null_is(False)] = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # null: up to the context, as OpenAI's
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for it
    logprobs: Annotated[bool, _null_is(False)] = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's: end the prompt with the assistant's turn
    tools: list | None = None
    response_format: dict | None = None


def refuse_unsupported(req: _Sampling) -> None:
    """APIError (400) naming the first field asked for that this server does not do."""
    chat = isinstance(req, ChatCompletionRequest)
    unsupported = [
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
        ("presence_penalty", req.presence_penalty != 0, "penalties are not supported"),
        ("frequency_penalty", req.frequency_penalty != 0, "penalties are not supported"),
        ("stream_options", req.stream_options is not None and not req.stream,
         "stream_options is only allowed with stream: true")]
    if chat:
        unsupported += [
            ("tools", bool(req.tools), "tools (function calling) are not supported"),
            ("response_format", req.response_format not in (None, {"type": "text"}),
             "response_format other than text is not supported"),
            ("top_logprobs", req.top_logprobs is not None and not req.logprobs,
             "top_logprobs needs logprobs: true"),
            ("max_tokens", req.max_tokens is not None and req.max_completion_tokens is not None
             and req.max_tokens != req.max_completion_tokens,
             "max_tokens and max_completion_tokens differ: give one")]
    else:
        unsupported += [
            ("best_of", req.best_of not in (None, 1), "best_of > 1 is not supported"),
            ("suffix", req.suffix is not None, "suffix is not supported")]
    for param, bad, why in unsupported:
        if bad:
            raise APIError(why, param)


@dataclass(frozen=True)
class Generation:
    """One request of either endpoint, in token ids: what the scheduler runs for it."""

    prompts: list[list[int]]
    max_tokens: int | None  # None: up to the context
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    min_tokens: int
    logprobs: int | None  # top tokens per position (None: no logprobs)
    echo: bool  # the prompt's text (and with logprobs, its tokens' logprobs) comes first
    speculative: SpeculativeOptions | None = None  # None: the server's default


def generation(req: _Sampling, prompts: list[list[int]]) -> Generation:
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        echo = False
    else:
        max_tokens, logprobs, echo = req.max_tokens, req.logprobs, req.echo
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError("stop: give at most 4 non-empty strings", "stop")
    return Generation(prompts, max_tokens, req.temperature, req.top_p, req.top_k, req.n, stops,
                      req.seed, tuple(req.stop_token_ids or ()), req.ignore_eos, req.min_tokens,
                      logprobs, echo, req.speculative)


# --- log-probabilities in OpenAI's shapes ----------------------------------------------------


class CompletionLogprobs:
    """Builds one choice's legacy ``logprobs`` object, whole or chunk by chunk (streaming):
    each ``take`` covers the entries since the last, with ``text_offset`` running on."""

    def __init__(self, token_text: Callable[[int], str], offset: int = 0):
        self.token_text = token_text
        self.offset = offset

    def take(self, entries: list[TokenLogprob | int]) -> dict:
        """``entries``: TokenLogprob per token, or a bare token id for one nothing scored
        (the first prompt token under echo)."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            token = e if isinstance(e, int) else e.token
            text = self.token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if isinstance(e, int):
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(e.logprob)
            top: dict[str, float] = {}
            for t, lp in e.top:  # most likely first: two tokens of one text keep the higher
                top.setdefault(self.token_text(t), lp)
            top.setdefault(text, e.logprob)  # the chosen token is always listed
            out["top_logprobs"].append(top)
        return out


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """The chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    def one(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob),
                         "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]}
