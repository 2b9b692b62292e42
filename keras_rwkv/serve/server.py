"""Runs `keras-rwkv serve`: the model, the batching engine and the HTTP
app under uvicorn, in this process."""

import logging

log = logging.getLogger("keras_rwkv")

MISSING_EXTRA = (
    "keras-rwkv serve needs its optional web stack: "
    "pip install 'keras-rwkv[serve]' (starlette and uvicorn)."
)


def check_extra():
    """Raises ImportError with the install line if the extra is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(MISSING_EXTRA) from e


def serve(
    lm,
    model_name,
    host="127.0.0.1",
    port=8000,
    max_batch=8,
    max_queue=64,
    state_cache_bytes=1 << 30,
    **app_kwargs,
):
    """Serves `lm` until interrupted (Ctrl-C stops the server cleanly).

    Args:
        lm: an `RWKV6CausalLM` with its preprocessor.
        model_name: the id clients name in `"model"`.
        host, port: where to listen.
        max_batch: requests decoded together.
        max_queue: requests that may wait; more get 429.
        state_cache_bytes: memory for cached prompt states (0: off).
        **app_kwargs: `create_app`'s limits (`max_prompt_tokens`,
            `default_max_tokens`, `max_tokens_limit`, `request_timeout`).
    """
    check_extra()
    import uvicorn

    from keras_rwkv.serve.app import create_app
    from keras_rwkv.serve.engine import Engine

    engine = Engine(
        lm,
        max_batch=max_batch,
        max_queue=max_queue,
        cache_bytes=state_cache_bytes,
    )
    app = create_app(engine, model_name, **app_kwargs)
    log.warning(
        "serving %s on http://%s:%d/v1 once its decoding step is built "
        "(OpenAI API; %d slots, state cache %d MiB)",
        model_name,
        host,
        port,
        max_batch,
        state_cache_bytes >> 20,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
