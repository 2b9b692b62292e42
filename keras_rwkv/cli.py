"""The `keras-rwkv` command line: generate, chat, convert."""

import argparse
import os
import sys

DEFAULT_PRESET = "rwkv6_world_1.6b"
CHAT_COMMANDS = """commands:
  /reset        forget the conversation (back to the start state)
  /save FILE    save the conversation state to FILE (.npz)
  /load FILE    continue from a saved state
  /help         this text
  /quit         leave (Ctrl-D works too)"""


def _convert(args):
    from keras_rwkv import RWKV6CausalLMPreprocessor
    from keras_rwkv import RWKV6Tokenizer
    from keras_rwkv.convert import convert_checkpoint
    from keras_rwkv.convert import write_preset

    backbone = convert_checkpoint(args.source, dtype=args.dtype)
    preprocessor = RWKV6CausalLMPreprocessor(RWKV6Tokenizer())
    path = write_preset(
        [backbone, preprocessor], args.output_dir, overwrite=args.overwrite
    )
    print(f"Wrote KerasHub preset to {path}")
    print(f"Generate with: keras-rwkv generate --preset {path} 'Hello'")


def _load_model(args):
    import keras
    import keras_hub

    import keras_rwkv  # noqa: F401  (registers classes and presets)
    from keras_rwkv.samplers import PenaltySampler

    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    try:
        lm = keras_hub.models.CausalLM.from_preset(args.preset, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(
            f"error: cannot load preset {args.preset!r}: {e}\n"
            "Pass --preset with a preset name or a directory made by "
            "`keras-rwkv convert MODEL.pth DIR`."
        ) from None
    inner = {
        "greedy": lambda: keras_hub.samplers.GreedySampler(),
        "top_k": lambda: keras_hub.samplers.TopKSampler(
            k=args.top_k, seed=args.seed
        ),
        "top_p": lambda: keras_hub.samplers.TopPSampler(
            p=args.top_p, k=args.top_k, seed=args.seed
        ),
        "random": lambda: keras_hub.samplers.RandomSampler(seed=args.seed),
    }[args.sampler]()
    lm.compile(
        sampler=PenaltySampler(
            inner,
            repetition_penalty=args.repetition_penalty,
            penalty_window=args.penalty_window,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            penalty_decay=args.penalty_decay,
            temperature=args.temperature,
        )
    )
    return lm


def _stream_printer(tokenizer, stop_ids, out):
    """A `generate(stream=...)` callback printing text as it comes, up to
    the first stop token."""
    decoder = tokenizer.stream_decoder()
    state = {"stopped": False}

    def callback(step_ids):
        token = int(step_ids[0])
        if state["stopped"]:
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
    _, state = lm.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=stop_ids,
        state=state,
        return_state=True,
        stream=callback,
    )
    finish()
    return state


def _generate(args):
    from keras_rwkv import RWKV6State

    lm = _load_model(args)
    tokenizer = lm.preprocessor.tokenizer
    state = RWKV6State.load(args.state_in) if args.state_in else None
    stop_ids = (tokenizer.end_token_id,)
    out = sys.stdout
    out.write(args.prompt)
    state = _stream_generate(lm, args.prompt, args, stop_ids, state, out)
    out.write("\n")
    if args.state_out:
        path = state.save(args.state_out)
        print(f"[state saved to {path}]", file=sys.stderr)


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
                if state is None:
                    state = lm.backbone.initial_state(1)
                out.write(f"[state saved to {state.save(arg)}]\n")
            elif command == "/load" and arg:
                try:
                    state = RWKV6State.load(arg)
                    state.check_compatible(lm.backbone)
                    out.write(f"[state loaded from {arg}]\n")
                except (OSError, ValueError) as e:
                    out.write(f"[cannot load {arg}: {e}]\n")
            else:
                out.write(CHAT_COMMANDS + "\n")
            continue
        out.write("Assistant:")
        prompt = f"User: {line}\n\nAssistant:"
        state = _stream_generate(lm, prompt, args, stop_ids, state, out)
        out.write("\n\n")


def _add_generation_args(p):
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"preset name or directory (default {DEFAULT_PRESET})",
    )
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument(
        "--sampler",
        choices=["top_p", "top_k", "greedy", "random"],
        default="top_p",
    )
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--penalty-window", type=int, default=None)
    p.add_argument("--presence-penalty", type=float, default=0.2)
    p.add_argument("--frequency-penalty", type=float, default=0.2)
    p.add_argument("--penalty-decay", type=float, default=0.996)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--dtype", default=None, help="e.g. bfloat16 (default: the preset's)"
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-rwkv",
        description="RWKV6 for Keras 3 and KerasHub.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="Continue a prompt (streams text).")
    gen.add_argument("prompt")
    _add_generation_args(gen)
    gen.add_argument("--state-in", help="start from a saved state (.npz)")
    gen.add_argument("--state-out", help="save the final state (.npz)")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="Chat; the state is kept across turns.")
    _add_generation_args(chat)
    chat.add_argument("--system", default=None, help="text read first")
    chat.set_defaults(func=_chat)

    convert = sub.add_parser(
        "convert",
        help="Convert a BlinkDL RWKV6 .pth checkpoint to a KerasHub preset.",
    )
    convert.add_argument("source", help="path to RWKV-x060-*.pth")
    convert.add_argument("output_dir", help="preset directory to write")
    convert.add_argument(
        "--dtype",
        default=None,
        help="dtype of the converted weights (float32, bfloat16, ...); "
        "default: the checkpoint's own (lossless)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT_DIR"
    )
    convert.set_defaults(func=_convert)
    return parser


def main(argv=None):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    args = build_parser().parse_args(argv)
    from keras_rwkv.convert import CheckpointError

    try:
        args.func(args)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
