"""The `keras-rwkv` command line's arguments: commands, options, checks.

`cli.py` runs the commands; this says what they accept. Numbers are
checked here (finite, in range), so a bad value is one argparse line.
"""

import argparse
import math

from keras_rwkv import entry

DEFAULT_PRESET = "rwkv6_world_1.6b"


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: a finite `kind` within [low, high] (or
    (low, high] with `low_open`)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a{'n integer' if kind is int else ' number'}: {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
        too_low = low is not None and (
            value <= low if low_open else value < low
        )
        if too_low or (high is not None and value > high):
            left = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"{text} is outside {left}{low}, {high}]"
            )
        return value

    return parse


def _add_common_args(p):
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="say which backend, kernel and cache run, with timings; "
        "tracebacks on errors",
    )
    p.add_argument(
        "--backend",
        choices=entry.BACKENDS,
        default=None,
        help="Keras backend (default: $KERAS_BACKEND, else jax when "
        "installed, else torch, else tensorflow)",
    )


def _add_model_args(p):
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="preset name, a directory made by `keras-rwkv convert`, or "
        "hf://org/repo (an RWKV6 or KerasHub-format repository)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="compute dtype, e.g. bfloat16 (default: the preset's)",
    )


def _add_generation_args(p):
    _add_model_args(p)
    p.add_argument(
        "--max-new-tokens",
        type=_number(int, 1),
        default=200,
        help="tokens to generate (fewer if the model ends the text)",
    )
    p.add_argument(
        "--sampler",
        choices=["top_p", "top_k", "greedy", "random"],
        default="top_p",
        help="how the next token is picked: top_p (nucleus), top_k, greedy "
        "(the most likely) or random (the whole distribution)",
    )
    p.add_argument(
        "--top-p",
        type=_number(float, 0, 1, low_open=True),
        default=0.85,
        help="top_p: sample among the most likely tokens that make up this "
        "much probability",
    )
    p.add_argument(
        "--top-k",
        type=_number(int, 1),
        default=None,
        help="top_k: sample among this many most likely tokens (default 5); "
        "with top_p, a cap on its candidates (default: none)",
    )
    p.add_argument(
        "--temperature",
        type=_number(float, 0, low_open=True),
        default=1.0,
        help="divides the logits: below 1 sharper, above 1 more varied",
    )
    p.add_argument(
        "--repetition-penalty",
        type=_number(float, 0, low_open=True),
        default=1.0,
        help="per earlier occurrence of a token in the text so far, divide "
        "its logit by this (multiply when negative); 1 disables",
    )
    p.add_argument(
        "--penalty-window",
        type=_number(int, 1),
        default=None,
        help="count only the last N tokens for --repetition-penalty "
        "(default: all)",
    )
    p.add_argument(
        "--presence-penalty",
        type=_number(float),
        default=0.2,
        help="subtracted from the logit of every token generated so far",
    )
    p.add_argument(
        "--frequency-penalty",
        type=_number(float),
        default=0.2,
        help="times each generated token's decayed count, subtracted from "
        "its logit",
    )
    p.add_argument(
        "--penalty-decay",
        type=_number(float, 0, 1, low_open=True),
        default=0.996,
        help="per-token decay of the --frequency-penalty counts",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed, for repeatable sampling (default: a new one "
        "each run)",
    )
    _add_jit_compile_arg(p, "its first token waits a minute or two")


def _add_jit_compile_arg(p, delay):
    p.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"torch: compile the decoding step ({delay}, then decoding "
        "runs ~30x faster; default: on with a CUDA GPU). JAX always compiles",
    )


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "%(default)" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def build_parser(handlers):
    """The argument parser; `handlers` maps each command to the function
    that runs it (`args.func`)."""
    parser = argparse.ArgumentParser(
        prog="keras-rwkv",
        description="RWKV6 for Keras 3 and KerasHub.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        p = sub.add_parser(
            name, help=help, description=help, formatter_class=_HelpFormatter
        )
        _add_common_args(p)
        return p

    gen = command("generate", "Continue a prompt (streams text).")
    gen.add_argument("prompt", help="the text to continue")
    _add_generation_args(gen)
    gen.add_argument("--state-in", help="start from a saved state (.npz)")
    gen.add_argument("--state-out", help="save the final state (.npz)")
    gen.set_defaults(func=handlers["generate"])

    chat = command("chat", "Chat; the state is kept across turns.")
    _add_generation_args(chat)
    chat.add_argument(
        "--system", default=None, help="text the model reads first"
    )
    chat.set_defaults(func=handlers["chat"])

    convert = command(
        "convert",
        "Convert an RWKV6 checkpoint (BlinkDL .pth, Hugging Face or "
        "bert4keras3 directory) to a KerasHub preset.",
    )
    convert.add_argument(
        "source",
        help="RWKV-x060-*.pth, or a Hugging Face (transformers or fla "
        "layout) or bert4keras3 model directory",
    )
    convert.add_argument("output_dir", help="preset directory to write")
    convert.add_argument(
        "--dtype",
        default=None,
        help="dtype of the converted weights (float32, bfloat16, ...); "
        "default: the checkpoint's own (lossless)",
    )
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT_DIR if it is a keras-rwkv preset",
    )
    convert.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="accept NaN or infinite weights (refused by default)",
    )
    convert.set_defaults(func=handlers["convert"])

    export = command(
        "export",
        "Write a preset as a BlinkDL RWKV6 .pth (for BlinkDL's rwkv, "
        "ChatRWKV, RWKV-PEFT).",
    )
    export.add_argument(
        "preset",
        help="preset name or directory (a fine-tuned model saved with "
        "save_to_preset, say)",
    )
    export.add_argument("output", help="the .pth file to write")
    export.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="dtype of the written weights; default: the preset's own",
    )
    export.add_argument(
        "--drop-time-shift",
        action="store_true",
        help="leave tuned token-shift states out (the .pth format has no "
        "place for them; a tuned WKV state is kept)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it exists"
    )
    export.set_defaults(func=handlers["export"])

    _add_serve_command(command("serve", SERVE_HELP), handlers["serve"])
    return parser


SERVE_HELP = (
    "Serve the model over the OpenAI API (/v1/completions, "
    "/v1/chat/completions, streaming), batching concurrent requests and "
    "caching prompt states. Needs pip install 'keras-rwkv[serve]'."
)


def _add_serve_command(p, handler):
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--port", type=_number(int, 0, 65535), default=8000, help="port"
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="the model id clients send and /v1/models lists (default: "
        "the preset's name)",
    )
    p.add_argument(
        "--max-batch",
        type=_number(int, 1, 1024),
        default=8,
        help="requests decoded together, one step for all",
    )
    p.add_argument(
        "--max-queue",
        type=_number(int, 1),
        default=64,
        help="requests that may wait for a slot; more are answered 429",
    )
    p.add_argument(
        "--state-cache-mb",
        type=_number(int, 0),
        default=1024,
        help="memory for the states after prompt prefixes (chat turns, "
        "system prompts); 0 turns the cache off",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=_number(int, 1),
        default=32768,
        help="longer prompts are answered 400",
    )
    p.add_argument(
        "--default-max-tokens",
        type=_number(int, 1),
        default=256,
        help="tokens generated when a request gives no max_tokens",
    )
    p.add_argument(
        "--request-timeout",
        type=_number(float, 0, low_open=True),
        default=600.0,
        help="seconds a request may wait and run; then it ends (504, or "
        "finish_reason 'timeout' when streaming)",
    )
    _add_jit_compile_arg(p, "the server starts a minute or two later")
    p.set_defaults(func=handler)


def _version():
    from keras_rwkv import __version__

    return __version__
