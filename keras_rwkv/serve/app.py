"""The OpenAI-compatible HTTP API of `keras-rwkv serve` (Starlette).

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with
`"stream": true` as server-sent events), `GET /v1/models`, `GET /health`.
Generation runs in the `Engine` thread; a handler tokenizes, submits a
`Job` and relays its events. Bad input is a 400 with OpenAI's error body,
a full queue a 429, a stopped engine a 503, a timeout a 504.
"""

import asyncio
import contextlib
import itertools
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.responses import StreamingResponse
from starlette.routing import Route

from keras_rwkv.serve import chat
from keras_rwkv.serve import protocol
from keras_rwkv.serve.engine import EngineStopped
from keras_rwkv.serve.engine import Job
from keras_rwkv.serve.engine import QueueFull
from keras_rwkv.serve.protocol import RequestError

DISCONNECT_POLL_S = 0.5


def create_app(engine, model_name, **limits):
    """The Starlette app serving `engine`'s model as `model_name`; starting
    it starts the engine, stopping it stops the engine.

    Args:
        engine: the `Engine`.
        model_name: the id clients send as `"model"`.
        **limits: `max_prompt_tokens` (32768; longer prompts get 400),
            `default_max_tokens` (256), `max_tokens_limit` (32768),
            `request_timeout` (600 seconds).
    """
    api = _Api(engine, model_name, **limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.running:
            engine.start()
        yield
        engine.stop()

    return Starlette(
        routes=[
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/health", api.health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def _error(e):
    return JSONResponse(e.body(), status_code=e.status)


class _Api:
    def __init__(
        self,
        engine,
        model_name,
        max_prompt_tokens=32768,
        default_max_tokens=256,
        max_tokens_limit=32768,
        request_timeout=600.0,
    ):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_prompt_tokens = max_prompt_tokens
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.request_timeout = request_timeout
        self.created = int(time.time())

    async def models(self, request):
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "keras-rwkv",
                    }
                ],
            }
        )

    async def health(self, request):
        stats = self.engine.stats()
        ok = stats["running"]
        return JSONResponse(
            {
                "status": "ok" if ok else "unavailable",
                "model": self.model_name,
                **stats,
            },
            status_code=200 if ok else 503,
        )

    async def completions(self, request):
        try:
            body = protocol.parse_body(await request.body())
            params = self._common(body)
            ids = self._ids([protocol.completion_prompt(body)])
        except RequestError as e:
            return _error(e)
        return await self._run(request, "text_completion", ids, params)

    async def chat(self, request):
        try:
            body = protocol.parse_body(await request.body())
            params = self._common(body)
            messages = protocol.chat_messages(body)
            segments = chat.conversation_segments(messages)
            pieces = self.tokenizer.tokenize(segments)
            ids = [i for piece in pieces for i in piece]
            self._check_length(ids)
        except RequestError as e:
            return _error(e)
        # Message ends are worth caching; so is the reply in the form the
        # next request will send it back (read once, after the reply).
        ends = list(itertools.accumulate(len(p) for p in pieces))
        prefix = ids[: ends[-2]] if len(ends) > 1 else []

        def follow_up(text):
            reply = chat.reply_text(chat.clean_reply(text))
            return prefix, self.tokenizer.tokenize(reply)

        params["stop"] = [chat.TURN_END, *params["stop"]]
        return await self._run(
            request,
            "chat.completion",
            ids,
            params,
            boundaries=ends[:-1],
            follow_up=follow_up if prefix else None,
        )

    # --- shared -------------------------------------------------------

    def _common(self, body):
        sampling, max_tokens, stop, stream, usage = protocol.common(
            body,
            [self.model_name],
            self.default_max_tokens,
            self.max_tokens_limit,
        )
        try:
            sampler = protocol.make_sampler(sampling)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return {
            "sampler": sampler,
            "max_tokens": max_tokens,
            "stop": stop,
            "stream": stream,
            "include_usage": usage,
        }

    def _ids(self, texts):
        ids = self.tokenizer.tokenize(texts)[0] or [0]  # "" starts at id 0
        self._check_length(ids)
        return ids

    def _check_length(self, ids):
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(
                f"The prompt has {len(ids)} tokens; this server reads at most "
                f"{self.max_prompt_tokens} (--max-prompt-tokens).",
                param="prompt",
                code="context_length_exceeded",
            )

    async def _run(
        self, request, kind, ids, params, boundaries=(), follow_up=None
    ):
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()

        def emit(event, data):
            loop.call_soon_threadsafe(events.put_nowait, (event, data))

        job = Job(
            ids,
            params["sampler"],
            params["max_tokens"],
            emit,
            stop_texts=params["stop"],
            boundaries=boundaries,
            deadline=time.monotonic() + self.request_timeout,
            follow_up=follow_up,
        )
        try:
            self.engine.submit(job)
        except QueueFull as e:
            return _error(
                RequestError(
                    f"The server is busy ({e}). Retry later.",
                    status=429,
                    kind="rate_limit_error",
                    code="rate_limit_exceeded",
                )
            )
        except EngineStopped as e:
            return _error(
                RequestError(
                    f"The server cannot generate now ({e}).",
                    status=503,
                    kind="server_error",
                )
            )
        reply = _Reply(kind, self.model_name, job)
        if params["stream"]:
            return StreamingResponse(
                self._stream(job, events, reply, params["include_usage"]),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await self._whole(request, job, events, reply)

    async def _whole(self, request, job, events, reply):
        text = []
        while True:
            try:
                event, data = await asyncio.wait_for(
                    events.get(), DISCONNECT_POLL_S
                )
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return JSONResponse({}, status_code=499)
                continue
            if event == "text":
                text.append(data)
            elif event == "error":
                return _error(RequestError(data, 500, "server_error"))
            elif data == "timeout":
                return _error(_timeout(self.request_timeout))
            else:
                return JSONResponse(reply.whole("".join(text), data))

    async def _stream(self, job, events, reply, include_usage):
        try:
            if reply.chat:  # the role comes first
                yield _sse(reply.chunk(None, None, first=True))
            while True:
                event, data = await events.get()
                if event == "text":
                    piece = reply.piece(data)
                    if piece:
                        yield _sse(reply.chunk(piece, None))
                elif event == "error":
                    yield _sse(RequestError(data, 500, "server_error").body())
                    break
                elif data == "timeout":
                    yield _sse(_timeout(self.request_timeout).body())
                    break
                else:
                    yield _sse(reply.chunk(None, data))
                    if include_usage:
                        yield _sse(reply.usage_chunk())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (or nothing: it ended)


def _timeout(seconds):
    return RequestError(
        f"The request took longer than {seconds:g} s (--request-timeout).",
        status=504,
        kind="timeout_error",
        code="timeout",
    )


def _sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Reply:
    """The response objects of one request, in OpenAI's shapes."""

    def __init__(self, kind, model, job):
        self.kind, self.model, self.job = kind, model, job
        self.chat = kind == "chat.completion"
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = False  # chat: leading spaces not yet dropped

    def piece(self, text):
        """A piece of text as sent: a reply's leading spaces dropped, as
        `clean_reply` does for the whole text."""
        if self.chat and not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text

    def usage(self):
        job = self.job
        return {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(job.generated),
            "total_tokens": len(job.prompt_ids) + len(job.generated),
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
        }

    def _base(self, suffix=""):
        return {
            "id": self.id,
            "object": self.kind + suffix,
            "created": self.created,
            "model": self.model,
        }

    def whole(self, text, finish_reason):
        if self.chat:
            choice = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": chat.clean_reply(text),
                },
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        return {**self._base(), "choices": [choice], "usage": self.usage()}

    def chunk(self, text, finish_reason, first=False):
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {
                "index": 0,
                "delta": delta,
                "finish_reason": finish_reason,
            }
            return {**self._base(".chunk"), "choices": [choice]}
        choice = {
            "index": 0,
            "text": text or "",
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        return {**self._base(), "choices": [choice]}

    def usage_chunk(self):
        suffix = ".chunk" if self.chat else ""
        return {**self._base(suffix), "choices": [], "usage": self.usage()}
