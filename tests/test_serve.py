"""`keras-rwkv serve` with the real `openai` client against a server on
localhost (a tiny random World-vocabulary model): answers equal
`lm.generate` with the same sampler and seed, concurrent clients, the
state cache, bad requests, cancellation."""

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import keras
import keras_hub
import openai
import pytest
import uvicorn

from keras_rwkv.serve import Engine
from keras_rwkv.serve import Job
from keras_rwkv.serve import Sampling
from keras_rwkv.serve import create_app
from keras_rwkv.serve import make_sampler
from keras_rwkv.serve.chat import conversation_segments
from keras_rwkv.serve.engine import QueueFull
from tests.reference import save_tiny_world_preset

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="a server thread beside the test; run once, in the JAX pass",
)
MODEL = "rwkv6-tiny"
MAX_PROMPT = 300


class Reply:
    def __init__(self, status, body):
        self.status_code, self.body = status, body

    def json(self):
        return json.loads(self.body)


def request_http(method, url, body=None, content=None):
    """One plain HTTP request (no client library, no retries)."""
    host, _, path = url.removeprefix("http://").partition("/")
    connection = http.client.HTTPConnection(host, timeout=120)
    if body is not None:
        content = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if content else {}
    connection.request(method, "/" + path, body=content, headers=headers)
    response = connection.getresponse()
    reply = Reply(response.status, response.read())
    connection.close()
    return reply


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "preset"
    save_tiny_world_preset(path)
    return str(path)


@pytest.fixture(scope="module")
def server(preset):
    lm = keras_hub.models.CausalLM.from_preset(preset)
    engine = Engine(lm, max_batch=4, max_queue=64, cache_bytes=64 << 20)
    app = create_app(
        engine, MODEL, max_prompt_tokens=MAX_PROMPT, default_max_tokens=12
    )
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def reference(preset):
    """A second copy of the model for `generate` (the server's runs in its
    own thread)."""
    return keras_hub.models.CausalLM.from_preset(preset)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server[1] + "/v1", api_key="unused", max_retries=0
    )


def openai_args(sampling):
    """OpenAI's own parameters, and top_k (ours) in the extra body."""
    args = dict(sampling)
    extra = {"top_k": args.pop("top_k")} if "top_k" in args else {}
    return {**args, "extra_body": extra}


def generated(lm, prompt, n, **sampling):
    lm.compile(sampler=make_sampler(Sampling(**sampling)))
    return lm.generate(prompt, max_new_tokens=n, strip_prompt=True)


SAMPLINGS = [
    dict(temperature=0),
    dict(temperature=0.8, top_p=0.9, seed=7),
    dict(temperature=1.0, top_k=5, seed=3, presence_penalty=0.5),
    dict(temperature=0.7, seed=11, frequency_penalty=1.0),
]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_completions_equal_generate(client, reference, sampling):
    prompt = "The capital of France is"
    expected = generated(reference, prompt, 10, **sampling)
    args = openai_args(sampling)
    whole = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, **args
    )
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, stream=True, **args
    )
    assert "".join(c.choices[0].text for c in stream) == expected


def expected_reply(lm, messages, n, **sampling):
    segments = conversation_segments(messages)
    tokenizer = lm.preprocessor.tokenizer
    rendered = "".join(segments)
    # Read per message, which here is the same as the whole text.
    assert tokenizer(rendered) == sum(tokenizer(segments), [])
    text = generated(lm, rendered, n, **sampling)
    return text.split("\n\n")[0].lstrip()


def test_chat_equals_generate_and_streams_the_same(client, reference):
    messages = [("system", "Be brief."), ("user", "Hello there")]
    body = [{"role": r, "content": c} for r, c in messages]
    for sampling in SAMPLINGS[:2]:
        expected = expected_reply(reference, messages, 12, **sampling)
        whole = client.chat.completions.create(
            model=MODEL, messages=body, max_tokens=12, **sampling
        )
        assert whole.choices[0].message.content == expected
        assert whole.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(
            model=MODEL, messages=body, max_tokens=12, stream=True, **sampling
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == (
            expected
        )


def test_sixteen_concurrent_clients(client, reference):
    prompts = [f"Request number {i}: tell me about {i * 7}" for i in range(16)]
    # One batched call (a batch equals each prompt alone: test_generate.py);
    # one call a prompt recompiled for each and took most of this test.
    answers = generated(reference, prompts, 8, temperature=0)
    expected = dict(zip(prompts, answers))

    def ask(prompt):
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0
        )
        return prompt, out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = dict(pool.map(ask, prompts))
    assert answers == expected


def test_second_chat_turn_reads_only_the_new_tokens(client, server):
    engine, _ = server
    tokenizer = engine.tokenizer
    first = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Name a colour."},
    ]
    one = client.chat.completions.create(
        model=MODEL, messages=first, max_tokens=6, temperature=0
    )
    second = first + [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": "And another one?"},
    ]
    read_before = engine.counters["prompt_tokens_read"]
    two = client.chat.completions.create(
        model=MODEL, messages=second, max_tokens=6, temperature=0
    )
    new = len(tokenizer("User: And another one?\n\n")) + len(
        tokenizer("Assistant:")
    )
    usage = two.usage
    assert (
        usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens == new
    )
    # Only the new message (and the reply prefix) was read.
    assert engine.counters["prompt_tokens_read"] - read_before == new
    # Another user with the same system prompt starts after it.
    other = client.chat.completions.create(
        model=MODEL,
        messages=[first[0], {"role": "user", "content": "Name a fruit."}],
        max_tokens=2,
        temperature=0,
    )
    system = len(tokenizer("System: You answer in one line.\n\n"))
    assert other.usage.prompt_tokens_details.cached_tokens == system
    health = request_http("GET", server[1] + "/health").json()
    assert health["state_cache"]["hits"] >= 2


BAD = [
    ({"model": "gpt-4", "prompt": "x"}, "does not exist"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 2}, "n=2"),
    ({"model": MODEL, "prompt": "x", "top_p": "high"}, "top_p"),
    ({"model": MODEL, "prompt": 5}, "prompt must be a string"),
    ({"model": MODEL, "prompt": "x " * 400}, "at most 300"),
    ({"model": MODEL, "prompt": "x", "stop": [1]}, "stop"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_requests_get_400_and_the_server_keeps_serving(
    server, client, body, message
):
    reply = request_http("POST", server[1] + "/v1/completions", body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert message in error["message"] and error["type"]
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert out.choices[0].finish_reason == "length"


def test_malformed_bodies(server):
    url = server[1] + "/v1/chat/completions"
    for content, message in [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"model": MODEL}).encode(), "messages"),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "bot", "content": ""}]}
            ).encode(),
            "role",
        ),
    ]:
        reply = request_http("POST", url, content=content)
        assert reply.status_code == 400, content
        assert message in reply.json()["error"]["message"]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = request_http("GET", server[1] + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4


def test_a_full_queue_answers_429(server, monkeypatch):
    engine, url = server

    def full(job):
        raise QueueFull("64 requests are already waiting")

    monkeypatch.setattr(engine, "submit", full)
    reply = request_http(
        "POST", url + "/v1/completions", {"model": MODEL, "prompt": "x"}
    )
    assert reply.status_code == 429
    assert reply.json()["error"]["type"] == "rate_limit_error"


def test_a_client_that_goes_away_frees_its_slot(server):
    engine, url = server
    before = engine.counters["cancelled"]
    body = {"model": MODEL, "prompt": "Go on", "max_tokens": 5000}
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(
        "POST",
        "/v1/completions",
        body=json.dumps({**body, "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.readline().startswith(b"data:")  # one chunk...
    connection.close()  # ...then hang up
    deadline = time.monotonic() + 30
    while engine.counters["cancelled"] == before:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert engine.stats()["active"] == 0


def test_timeouts_end_a_job(server):
    engine, _ = server
    events = []
    done = threading.Event()

    def emit(kind, data):
        events.append((kind, data))
        if kind != "text":
            done.set()

    sampler = make_sampler(Sampling(temperature=0))
    job = Job([5, 6], sampler, 5000, emit, deadline=time.monotonic() + 0.5)
    engine.submit(job)
    assert done.wait(30)
    assert events[-1] == ("done", "timeout")


def test_a_failing_reply_cache_does_not_stop_the_server(client, server):
    engine, _ = server

    def broken(job):
        raise RuntimeError("the cache broke")

    engine._cache_follow_up = broken
    try:
        messages = [{"role": "user", "content": "Tell me more."}]
        for _ in range(2):
            reply = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=3, temperature=0
            )
            assert reply.choices[0].finish_reason in ("stop", "length")
        assert engine.running
    finally:
        del engine._cache_follow_up
