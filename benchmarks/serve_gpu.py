"""`keras-rwkv serve` under load: a random RWKV6 1.6B (bfloat16, World
tokenizer) behind the real server on localhost, driven by plain HTTP
clients in threads (the server cannot tell them from the `openai` client).

Reports, at 1, 8 and 32 concurrent clients (each sending streaming
completions back to back, `--new` tokens each, sampled with top_p and a
seed): requests/s, generated tokens/s, and the median time to the first
token. Then time to first token of a chat request whose long system
prompt is new (read whole) against one whose system prompt is cached (only
the new message read), each median of several distinct prompts.

    python3 benchmarks/serve_gpu.py --out $OUT
    python3 benchmarks/serve_gpu.py --backend torch --out $OUT
    python3 benchmarks/serve_gpu.py --tiny     # a CPU smoke test

On torch the model is compiled with `jit_compile=True` (the engine then
decodes through `generate`'s compiled step, as `keras-rwkv serve` does
where a GPU is); `--profile` is JAX's only.
"""

import argparse
import concurrent.futures
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import RWKV6_1B6  # noqa: E402

WORDS = (
    "the state of a recurrent model is a fixed size summary of everything "
    "it has read so far and serving reuses it across requests"
).split()


def text_of(n_words, seed):
    return " ".join(
        WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words)
    )


def stream(port, path, body):
    """One streaming request: (seconds to first text, total seconds,
    completion tokens, cached prompt tokens)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request(
        "POST", path, json.dumps(body), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]}")
    first, usage = None, None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        choice = (chunk.get("choices") or [{}])[0]
        piece = choice.get("text") or (choice.get("delta") or {}).get("content")
        if piece and first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    conn.close()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return first or total, total, usage["completion_tokens"], cached


def client(port, index, per_client, new, model):
    """One client's requests, back to back (in its own process)."""
    results, errors = [], []
    for j in range(per_client):
        body = {
            "model": model,
            "prompt": text_of(40, index * 100 + j),
            "max_tokens": new,
            "temperature": 1.0,
            "top_p": 0.9,
            "seed": index * 100 + j,
        }
        try:
            results.append(stream(port, "/v1/completions", body))
        except Exception as e:  # noqa: BLE001 - counted, reported
            errors.append(repr(e))
    return results, errors


def load_level(port, clients, per_client, new, model):
    # Clients in processes of their own, as real ones are: threads here
    # would take the server's interpreter lock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(clients, context) as pool:
        list(pool.map(time.sleep, [0.2] * clients))  # started, warm
        start = time.perf_counter()
        done = list(
            pool.map(
                client,
                *zip(
                    *[(port, i, per_client, new, model) for i in range(clients)]
                ),
            )
        )
        wall = time.perf_counter() - start
    results = [r for rs, _ in done for r in rs]
    errors = [e for _, es in done for e in es]
    tokens = sum(r[2] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors[:3],
        "wall_s": wall,
        "requests_s": len(results) / wall,
        "tokens_s": tokens / wall,
        "ttft_ms_median": 1e3 * statistics.median(r[0] for r in results),
        "tokens": tokens,
    }


def _in_process(fn, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, context) as pool:
        pool.submit(time.sleep, 0.1).result()
        return pool.submit(fn, *args).result()


def prefix_ttft(port, model, system_words, repeats):
    """TTFT of chat requests with a new long system prompt (a miss) and
    then the same system prompt with another question (a hit)."""
    miss, hit, cached = [], [], []
    for k in range(repeats):
        system = f"Document {k}: " + text_of(system_words, 1000 + k)
        for question, into in (("Summarise it.", miss), ("Who wrote it?", hit)):
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 4,
                "temperature": 0,
            }
            first, _, _, cached_tokens = _in_process(
                stream, port, "/v1/chat/completions", body
            )
            into.append(first)
            if into is hit:
                cached.append(cached_tokens)
    return {
        "system_words": system_words,
        "ttft_miss_ms": 1e3 * statistics.median(miss),
        "ttft_hit_ms": 1e3 * statistics.median(hit),
        "cached_tokens_median": statistics.median(cached),
    }


def profile_engine(engine, clients, new):
    """The engine alone (no HTTP) decoding `clients` sampled requests:
    its thread's Python time (cProfile, by own time) and the GPU's kernels
    over the same span (JAX profiler)."""
    import cProfile
    import io
    import pstats
    import types

    from gpu_profile import format_summary
    from gpu_profile import profile

    from keras_rwkv.serve import Job
    from keras_rwkv.serve import Sampling
    from keras_rwkv.serve import make_sampler

    python = cProfile.Profile()
    original = type(engine)._step
    active = [False]

    def step(self):
        if not active[0]:
            return original(self)
        python.enable()
        try:
            original(self)
        finally:
            python.disable()

    engine._step = types.MethodType(step, engine)
    ids = engine.tokenizer.tokenize(text_of(40, 7))

    def work():
        done = threading.Semaphore(0)

        def emit(kind, data):
            if kind in ("done", "error"):
                done.release()

        for i in range(clients):
            sampler = make_sampler(Sampling(top_p=0.9, seed=i))
            engine.submit(Job(list(ids), sampler, new, emit))
        for _ in range(clients):
            done.acquire()

    work()  # the shapes compiled
    active[0] = True  # cProfile and the JAX profiler one after the other
    work()
    active[0] = False
    del engine._step
    gpu = profile(work, top=12)
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(22)
    return format_summary(gpu), text.getvalue()


def generate_anchor(lm, new, batches):
    """`lm.generate` tokens/s at each batch (one call, `new` tokens per
    row, the same top_p sampler), median of 3 after a warm-up: what the
    model decodes without a server. Run before the server starts, and the
    sampler left in place (the engine samples with its own), so that the
    engine reuses the step programs built here (a `compile` drops them:
    on torch each is minutes of inductor for the 1.6B)."""
    import numpy as np
    from timing import median_seconds

    from keras_rwkv.serve import Sampling
    from keras_rwkv.serve import make_sampler

    lm.compile(sampler=make_sampler(Sampling(top_p=0.9, seed=0)), **JIT)
    rates = {}
    for batch in batches:
        ids = np.random.default_rng(0).integers(1, 60000, (batch, 40))
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

        def gen(inputs=inputs):
            lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)

        rates[batch] = batch * new / median_seconds(gen, 3)
    return rates


JIT = {}  # {"jit_compile": True} on torch


def device_kind():
    import keras

    if keras.config.backend() == "torch":
        import torch

        return (
            torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        )
    import jax

    return str(jax.devices()[0].device_kind)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--per-client", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--system-words", type=int, default=1500)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--profile",
        default="",
        help="client counts to profile the engine at (e.g. 1,32), after "
        "the load levels",
    )
    parser.add_argument("--backend", choices=("jax", "torch"))
    args = parser.parse_args()
    # Made before the run: a missing folder must not lose a measurement.
    os.makedirs(args.out, exist_ok=True)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    import uvicorn

    from keras_rwkv import RWKV6Backbone
    from keras_rwkv import RWKV6CausalLM
    from keras_rwkv import RWKV6CausalLMPreprocessor
    from keras_rwkv import RWKV6Tokenizer
    from keras_rwkv.serve import Engine
    from keras_rwkv.serve import create_app

    shapes = dict(RWKV6_1B6)
    if args.tiny:
        shapes.update(num_layers=2, hidden_dim=128, intermediate_dim=256)
    keras.utils.set_random_seed(0)
    dtype = "float32" if args.tiny else "bfloat16"
    backbone = RWKV6Backbone(**shapes, dtype=dtype)
    preprocessor = RWKV6CausalLMPreprocessor(RWKV6Tokenizer())
    lm = RWKV6CausalLM(backbone, preprocessor)
    if keras.config.backend() == "torch":
        JIT["jit_compile"] = True
        if args.profile:
            parser.error("--profile is JAX's only")
    levels = [int(x) for x in args.levels.split(",")]
    generate_tok_s = generate_anchor(lm, args.new, levels)
    engine = Engine(lm, max_batch=args.max_batch, max_queue=256)
    model = "rwkv6-1b6-random"
    app = create_app(engine, model, request_timeout=3600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)

    result = {
        "device": device_kind(),
        "backend": keras.config.backend(),
        "new": args.new,
        "generate_tok_s": generate_tok_s,
    }
    # Warm-up: compiles the step (every batch mix runs the same program)
    # and the prompt reads of the lengths used below.
    load_level(port, 2, 1, 4, model)
    prefix_ttft(port, model, args.system_words, 1)
    result["levels"] = []
    for clients in levels:
        before = engine.stats()
        level = load_level(port, clients, args.per_client, args.new, model)
        after = engine.stats()
        steps = after["steps"] - before["steps"]
        # The engine thread's time per step, by phase.
        level["engine_ms_per_step"] = {
            k: 1e3 * (after["seconds"][k] - before["seconds"][k]) / steps
            for k in after["seconds"]
        }
        level["steps"] = steps
        result["levels"].append(level)
    result["prefix"] = prefix_ttft(port, model, args.system_words, 3)
    result["engine"] = {
        k: v for k, v in engine.stats().items() if k != "state_cache"
    }
    result["state_cache"] = engine.stats()["state_cache"]
    profiles = [
        (clients, *profile_engine(engine, clients, 32))
        for clients in (int(x) for x in args.profile.split(",") if x)
    ]
    server.should_exit = True
    print(json.dumps(result, indent=1))
    name = f"serve_gpu_{result['backend']}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"\n# {result['device']}, {result['backend']}, {args.new} new tokens "
        "a request"
    )
    print(
        "| clients | requests/s | tokens/s | lm.generate at that batch "
        "(anchor) | TTFT median | engine ms/step: admit, step, pick, emit |"
    )
    print("|---|---|---|---|---|---|")
    for r in result["levels"]:
        phases = ", ".join(f"{v:.2f}" for v in r["engine_ms_per_step"].values())
        print(
            f"| {r['clients']} | {r['requests_s']:.2f} | "
            f"{r['tokens_s']:,.0f} | "
            f"{result['generate_tok_s'][r['clients']]:,.0f} tok/s | "
            f"{r['ttft_ms_median']:.0f} ms | "
            f"{phases} |"
        )
    p = result["prefix"]
    print(
        f"TTFT system prompt of {p['system_words']} words: new "
        f"{p['ttft_miss_ms']:.0f} ms, cached {p['ttft_hit_ms']:.0f} ms "
        f"({p['cached_tokens_median']} tokens from the cache)"
    )
    for clients, gpu, python in profiles:
        print(f"\n## engine profile, {clients} clients, 32 tokens each")
        print(gpu)
        print(python)


if __name__ == "__main__":
    main()
