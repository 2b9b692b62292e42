"""Turn a checkpoint into a backbone."""

import os

import keras

from keras_rwkv.convert import bert4keras3
from keras_rwkv.convert import blinkdl
from keras_rwkv.convert import huggingface
from keras_rwkv.convert.torch_checkpoint import CheckpointError
from keras_rwkv.convert.torch_checkpoint import load_torch_checkpoint


def convert_checkpoint(
    source, dtype=None, progress=True, allow_non_finite=False
):
    """Builds an `RWKV6Backbone` holding the weights of `source`.

    Args:
        source: path to a BlinkDL RWKV6 `.pth` checkpoint, a Hugging Face
            RWKV6 model directory (transformers or fla layout;
            `config.json` and `*.safetensors` or `pytorch_model.bin`,
            sharded or not), or a bert4keras3 RWKV6 directory
            (`config.json`, `model.weights.h5`,
            `rwkv_vocab_v20230424.txt`).
        dtype: Keras dtype policy name for the backbone (`"float32"`,
            `"bfloat16"`, `"mixed_bfloat16"`, ...). `None` keeps the
            checkpoint's storage dtype (bfloat16 for the official models),
            which is lossless.
        progress: show a progress bar over the layers.
        allow_non_finite: accept NaN or infinite weights (refused by
            default: they make every output NaN).

    Returns:
        The `RWKV6Backbone`.
    """
    from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone

    source = os.fspath(source)
    if dtype is not None:
        try:
            keras.dtype_policies.get(dtype)
        except ValueError:
            raise ValueError(
                f"dtype={dtype!r} is not a Keras dtype policy; use e.g. "
                "float32, bfloat16, float16 or mixed_bfloat16."
            ) from None
    extra_config = {}
    if huggingface.is_hf_dir(source):
        weights, extra_config = huggingface.load_hf_dir(source)
    elif bert4keras3.is_bert4keras3_dir(source):
        weights = bert4keras3.load_bert4keras3_dir(source)
    elif os.path.isdir(source):
        raise CheckpointError(
            f"{source} is a directory of no format `convert` knows; it "
            "takes a BlinkDL `.pth` file, or a Hugging Face or bert4keras3 "
            "RWKV6 model directory. To load a KerasHub preset directory use "
            "`keras_hub.models.CausalLM.from_preset(DIR)` directly."
        )
    else:
        weights = load_torch_checkpoint(source)
    if not isinstance(weights, dict):
        raise CheckpointError(
            f"{source} holds a {type(weights).__name__}, not a state dict "
            "of tensors."
        )
    config = blinkdl.config_from_weights(weights)
    blinkdl.check_weights(weights, config)
    if not allow_non_finite:
        blinkdl.check_finite(weights, source)
    if dtype is None:
        dtype = blinkdl.checkpoint_dtype(weights)
    backbone = RWKV6Backbone(**config, **extra_config, dtype=dtype)
    bar = None
    if progress:
        bar = keras.utils.Progbar(
            config["num_layers"], unit_name="layer", verbose=1
        )
    blinkdl.assign_weights(
        backbone, weights, progress=bar.update if bar else None
    )
    # A model file with an RWKV-PEFT state merged in keeps that state.
    tuned = blinkdl.time_state_arrays(weights, config["num_layers"], source)
    if tuned is not None:
        backbone.set_tuned_state_arrays(tuned)
    return backbone
