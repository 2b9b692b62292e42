"""OpenAI request bodies -> checked generation parameters, and the
error bodies the API answers with.

Every check raises `RequestError` (HTTP status, an OpenAI-style error
body); nothing a client sends can raise anything else.
"""

import dataclasses
import json
import math
import numbers

from keras_hub.samplers import RandomSampler
from keras_hub.samplers import TopKSampler
from keras_hub.samplers import TopPSampler

from keras_rwkv.samplers import PenaltySampler


class RequestError(Exception):
    """A request the server refuses; `body()` is OpenAI's error shape."""

    def __init__(
        self,
        message,
        status=400,
        kind="invalid_request_error",
        param=None,
        code=None,
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = (
            status,
            kind,
            param,
            code,
        )

    def body(self):
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclasses.dataclass
class Sampling:
    """What a request asks of the sampler (OpenAI's names)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


def make_sampler(sampling):
    """The KerasHub sampler (wrapped in `PenaltySampler` for penalties and
    temperature) a request's `Sampling` stands for; `lm.generate` with it
    gives what the server gives.

    temperature 0 is greedy; otherwise top_p < 1 is nucleus sampling (with
    top_k as well, if given), else top_k, else plain sampling. Presence and
    frequency penalties are OpenAI's: every generated token counts, with no
    decay.
    """
    s = sampling
    if s.temperature == 0:
        inner, temperature = "greedy", 1.0
    else:
        temperature = s.temperature
        if s.top_p < 1:
            inner = TopPSampler(p=s.top_p, k=s.top_k, seed=s.seed)
        elif s.top_k is not None:
            inner = TopKSampler(k=s.top_k, seed=s.seed)
        else:
            inner = RandomSampler(seed=s.seed)
    return PenaltySampler(
        inner,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        unweighted_ids=None,
        temperature=temperature,
    )


def parse_body(raw):
    """The JSON object of a request body (bytes)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(
            f"The request body is not valid UTF-8 (byte {e.start})."
        ) from None
    try:
        body = json.loads(text)
    except ValueError as e:
        raise RequestError(
            f"The request body is not valid JSON: {e}."
        ) from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    return body


def _number(body, name, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = numbers.Integral if integer else numbers.Real
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        what = "an integer" if integer else "a number"
        raise RequestError(
            f"{name} must be {what} from {low} to {high}; got {value!r}.",
            param=name,
        )
    return int(value) if integer else float(value)


def _unsupported(body, checks):
    for name, allowed in checks:
        if name in body and body[name] not in allowed:
            raise RequestError(
                f"{name}={body[name]!r} is not supported by this server.",
                param=name,
            )


def common(body, model_names, default_max_tokens, max_tokens_limit):
    """The parameters completions and chat share: `(sampling, max_tokens,
    stop strings, stream, include_usage)`."""
    model = body.get("model")
    if model not in model_names:
        raise RequestError(
            f"The model {model!r} does not exist; this server serves "
            f"{', '.join(repr(m) for m in model_names)}.",
            param="model",
            code="model_not_found",
        )
    _unsupported(
        body,
        [
            ("n", (1, None)),
            ("best_of", (1, None)),
            ("logprobs", (None, False, 0)),
            ("top_logprobs", (None, 0)),
            ("echo", (None, False)),
            ("logit_bias", (None, {})),
        ],
    )
    sampling = Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=_number(body, "top_k", None, 1, 1 << 20, integer=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
    )
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number(
        {"max_tokens": limit},
        "max_tokens",
        default_max_tokens,
        1,
        max_tokens_limit,
        integer=True,
    )
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(
            "stop must be a non-empty string or a list of up to 4.",
            param="stop",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(
            "stream_options must be an object.", param="stream_options"
        )
    return (
        sampling,
        max_tokens,
        stop,
        stream,
        bool(options.get("include_usage")),
    )


def completion_prompt(body):
    """The one prompt string of a /v1/completions request."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(
            "prompt must be a string (one prompt a request).", param="prompt"
        )
    return prompt


def chat_messages(body):
    """`[(role, text)]` of a /v1/chat/completions request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            "messages must be a non-empty list.", param="messages"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(
                f"messages[{i}] must be an object.", param="messages"
            )
        role, content = message.get("role"), message.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}].role {role!r} is not system, user or "
                "assistant.",
                param="messages",
            )
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" for p in content
            ):
                raise RequestError(
                    f"messages[{i}].content: only text parts are supported.",
                    param="messages",
                )
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise RequestError(
                f"messages[{i}].content must be a string.", param="messages"
            )
        out.append((role, content))
    return out
