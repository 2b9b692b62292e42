"""The `keras-rwkv` command line: generate, chat, convert, export, serve.

The backend is chosen before Keras is imported (`entry.py`): `--backend`,
else `KERAS_BACKEND`, else JAX when installed. Errors are one or two lines
and a non-zero exit code; `--verbose` adds the tracebacks, the backend,
the kernel choice and timings.
"""

import logging
import os
import sys
import time
import traceback

from keras_rwkv import entry
from keras_rwkv.cli_parser import build_parser
from keras_rwkv.utils import compile_cache

CHAT_COMMANDS = """commands:
  /reset        forget the conversation (back to the start state)
  /save FILE    save the conversation state to FILE (.npz)
  /load FILE    continue from a saved state
  /help         this text
  /quit         leave (Ctrl-D works too)"""


def _convert(args):
    from keras_rwkv.convert.preset_writer import check_target

    # Refuse a target that cannot be written before the long conversion.
    check_target(
        os.path.abspath(args.output_dir), args.overwrite, [args.source]
    )
    _import_keras(args)
    from keras_rwkv import RWKV6CausalLMPreprocessor
    from keras_rwkv import RWKV6Tokenizer
    from keras_rwkv.convert import convert_checkpoint
    from keras_rwkv.convert import write_preset

    backbone = convert_checkpoint(
        args.source, dtype=args.dtype, allow_non_finite=args.allow_non_finite
    )
    preprocessor = RWKV6CausalLMPreprocessor(RWKV6Tokenizer())
    path = write_preset(
        [backbone, preprocessor],
        args.output_dir,
        overwrite=args.overwrite,
        protect=[args.source],
    )
    print(f"Wrote KerasHub preset to {path}")
    print(f"Generate with: keras-rwkv generate --preset {path} 'Hello'")


def _export(args):
    if os.path.exists(args.output) and not args.overwrite:
        raise CommandError(
            f"{args.output} already exists; choose another file or pass "
            "--overwrite."
        )
    keras, keras_hub = _import_keras(args)
    from keras_rwkv.convert import export_blinkdl

    backbone = keras_hub.models.Backbone.from_preset(args.preset)
    path = export_blinkdl(
        backbone,
        args.output,
        dtype=args.dtype,
        drop_time_shift=args.drop_time_shift,
    )
    print(f"Wrote BlinkDL checkpoint {path}")


def _import_keras(args):
    """Imports Keras and KerasHub on the chosen backend and registers our
    classes and presets; says which backend in `--verbose`."""
    import keras
    import keras_hub  # noqa: F401

    import keras_rwkv

    backend = keras.config.backend()
    if args.backend and args.backend != backend:
        raise CommandError(
            f"--backend {args.backend}: Keras in this process already runs "
            f"on {backend!r} (it was imported before the command started)."
        )
    cache = keras_rwkv.register()
    why = entry.choice[1] if entry.choice else "chosen by the caller"
    log.info("backend %s (%s); Keras %s", backend, why, keras.__version__)
    if backend == "jax":
        import jax

        log.info("jax %s on %s", jax.__version__, jax.devices())
    log.info("compilation cache: %s", cache or "off")
    return keras, keras_hub


def _load_preset(args):
    keras, keras_hub = _import_keras(args)
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    started = time.perf_counter()
    try:
        lm = keras_hub.models.CausalLM.from_preset(args.preset, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        from keras_rwkv.convert.preset_cache import MANIFEST

        unknown = not os.path.exists(args.preset) and "://" not in args.preset
        reason = "no such preset or directory" if unknown else _reason(e)
        reason = reason.rstrip(".")
        raise CommandError(
            f"cannot load preset {args.preset!r}: {reason}.\n"
            f"Pass --preset with a preset name ({', '.join(sorted(MANIFEST))}),"
            " a directory made by `keras-rwkv convert`, or hf://org/repo."
        ) from e
    log.info("loaded %s in %.1f s", args.preset, time.perf_counter() - started)
    return lm


def _load_model(args):
    lm = _load_preset(args)
    import keras
    import keras_hub

    from keras_rwkv.samplers import PenaltySampler

    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    inner = {
        "greedy": lambda: keras_hub.samplers.GreedySampler(),
        "top_k": lambda: keras_hub.samplers.TopKSampler(
            k=args.top_k or 5, seed=args.seed
        ),
        "top_p": lambda: keras_hub.samplers.TopPSampler(
            p=args.top_p, k=args.top_k, seed=args.seed
        ),
        "random": lambda: keras_hub.samplers.RandomSampler(seed=args.seed),
    }[args.sampler]()
    lm.compile(
        jit_compile=_torch_jit_compile(args),
        sampler=PenaltySampler(
            inner,
            repetition_penalty=args.repetition_penalty,
            penalty_window=args.penalty_window,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            penalty_decay=args.penalty_decay,
            temperature=args.temperature,
        ),
    )
    return lm


def _torch_jit_compile(args, wait="the first token waits for"):
    """`--jit-compile` on torch (default: with a CUDA GPU), where it makes
    `generate` (and the server) run its compiled step; elsewhere Keras's
    default."""
    import keras

    if keras.config.backend() != "torch":
        return "auto"
    on = args.jit_compile
    if on is None:
        import torch

        on = torch.cuda.is_available()
    if on:
        log.warning(
            "torch: the decoding step compiles first (%s it: a minute or "
            "two); --no-jit-compile decodes eagerly.",
            wait,
        )
    return bool(on)


def _stream_printer(tokenizer, stop_ids, out):
    """A `generate(stream=...)` callback printing text as it comes, up to
    the first stop token."""
    decoder = tokenizer.stream_decoder()
    state = {"stopped": False}

    def callback(step_ids):
        token = int(step_ids[0])
        if state["stopped"] or token < 0:
            return
        if token in stop_ids:
            state["stopped"] = True
            out.write(decoder.flush())
        else:
            out.write(decoder.add(token))
        out.flush()

    def finish():
        if not state["stopped"]:
            out.write(decoder.flush())
        out.flush()

    return callback, finish


def _stream_generate(lm, prompt, args, stop_ids, state, out):
    """Generates after `prompt`, printing text as it comes; returns the
    state after everything printed (stop token included)."""
    callback, finish = _stream_printer(lm.preprocessor.tokenizer, stop_ids, out)
    timing = {"start": time.perf_counter(), "first": None, "count": 0}

    def timed(step_ids):
        timing["first"] = timing["first"] or time.perf_counter()
        timing["count"] += 1
        callback(step_ids)

    _, state = lm.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=stop_ids,
        state=state,
        return_state=True,
        stream=timed,
    )
    finish()
    cache_counts = compile_cache.counts()
    if cache_counts is not None:
        log.info(
            "compilation cache: %d programs loaded, %d compiled",
            cache_counts["loaded"],
            cache_counts["compiled"],
        )
    if timing["first"] is not None:
        now, first = time.perf_counter(), timing["first"]
        rate = (timing["count"] - 1) / (now - first) if now > first else 0.0
        log.info(
            "first token after %.2f s; %d tokens, %.1f tok/s after it",
            first - timing["start"],
            timing["count"],
            rate,
        )
    return state


def _generate(args):
    from keras_rwkv import RWKV6State

    if args.state_out:
        _check_writable(args.state_out, "--state-out")
    lm = _load_model(args)
    tokenizer = lm.preprocessor.tokenizer
    state = None
    if args.state_in:
        state = RWKV6State.load(args.state_in)
        state.check_compatible(lm.backbone)
    stop_ids = (tokenizer.end_token_id,)
    out = sys.stdout
    out.write(args.prompt)
    state = _stream_generate(lm, args.prompt, args, stop_ids, state, out)
    out.write("\n")
    if args.state_out:
        path = state.save(args.state_out)
        print(f"[state saved to {path}]", file=sys.stderr)


def _reason(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _check_writable(path, option):
    """Fails before any work when `path` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CommandError(
            f"{option} {path}: the directory {directory} does not exist."
        )
    if not os.access(directory, os.W_OK):
        raise CommandError(f"{option} {path}: {directory} is not writable.")


def _turn_end_ids(tokenizer):
    """Ids that end an assistant turn: end of text and blank-line tokens."""
    ids = [tokenizer.end_token_id]
    for token_id, token in enumerate(tokenizer.get_vocabulary(), start=1):
        if isinstance(token, str) and len(token) >= 2 and not token.strip("\n"):
            ids.append(token_id)
    return tuple(ids)


def _chat(args, stdin=None, out=None):
    from keras_rwkv import RWKV6State

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    lm = _load_model(args)
    tokenizer = lm.preprocessor.tokenizer
    stop_ids = _turn_end_ids(tokenizer)

    def start_state():
        if args.system:
            return lm.prefill(args.system.rstrip("\n") + "\n\n")
        return None

    state = start_state()
    out.write(f"RWKV chat ({args.preset}). /help for commands.\n")
    while True:
        out.write("User: ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip()
            if command == "/quit":
                break
            elif command == "/reset":
                state = start_state()
                out.write("[conversation reset]\n")
            elif command == "/save" and arg:
                try:
                    current = state or lm.backbone.initial_state(1)
                    out.write(f"[state saved to {current.save(arg)}]\n")
                except Exception as e:  # noqa: BLE001 - the session goes on
                    out.write(f"[cannot save to {arg}: {_reason(e)}]\n")
            elif command == "/load" and arg:
                try:
                    loaded = RWKV6State.load(arg)
                    loaded.check_compatible(lm.backbone)
                except Exception as e:  # noqa: BLE001 - the session goes on
                    out.write(f"[cannot load {arg}: {_reason(e)}]\n")
                else:
                    state = loaded  # only once it is known to fit
                    out.write(f"[state loaded from {arg}]\n")
            else:
                out.write(CHAT_COMMANDS + "\n")
            continue
        out.write("Assistant:")
        prompt = f"User: {line}\n\nAssistant:"
        try:
            state = _stream_generate(lm, prompt, args, stop_ids, state, out)
        except Exception as e:  # noqa: BLE001 - keep the conversation
            out.write(
                f"\n[this turn failed: {_reason(e)}; the "
                "conversation is as before it]"
            )
        out.write("\n\n")


class CommandError(Exception):
    """A failure the command explains in its message (no traceback)."""


log = logging.getLogger("keras_rwkv")


def _serve(args):
    from keras_rwkv.serve import server

    try:
        server.check_extra()
    except ImportError as e:
        raise CommandError(str(e)) from None
    lm = _load_preset(args)
    if _torch_jit_compile(args, "the server starts after") is True:
        lm.compile(sampler="greedy", jit_compile=True)
    name = args.model_name or os.path.basename(args.preset.rstrip("/"))
    server.serve(
        lm,
        name,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        state_cache_bytes=args.state_cache_mb << 20,
        max_prompt_tokens=args.max_prompt_tokens,
        default_max_tokens=args.default_max_tokens,
        request_timeout=args.request_timeout,
    )


def _setup_logging(verbose):
    if not any(getattr(h, "_keras_rwkv_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._keras_rwkv_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # JAX's own "no GPU/TPU found" notice: our kernel line says it.
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def _explained_errors():
    """Errors whose message says what went wrong and what to do."""
    from keras_rwkv.convert import CheckpointError
    from keras_rwkv.convert.preset_cache import PresetDownloadError
    from keras_rwkv.models.rwkv6.rwkv6_weight_checks import PresetLoadError

    return (
        CommandError,
        CheckpointError,
        PresetDownloadError,
        PresetLoadError,
        FileExistsError,
        FileNotFoundError,
        ValueError,  # our validation's messages say what is wrong
    )


def main(argv=None):
    args = build_parser(
        {
            "generate": _generate,
            "chat": _chat,
            "convert": _convert,
            "export": _export,
            "serve": _serve,
        }
    ).parse_args(argv)
    if not args.verbose and entry.choice and entry.choice[0] == "tensorflow":
        entry.drop_native_stderr()  # TensorFlow's C++ start-up lines
    _setup_logging(args.verbose)
    if entry.choice is not None and entry.choice[0] not in entry.BACKENDS:
        print(
            f"error: KERAS_BACKEND={entry.choice[0]!r} is not a backend this "
            f"command runs on; use one of {', '.join(entry.BACKENDS)}.",
            file=sys.stderr,
        )
        return 2
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one or two lines, not a traceback
        if args.verbose:
            traceback.print_exc()
        if isinstance(e, _explained_errors()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"error: {type(e).__name__}: {e}\n"
            "(run again with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
