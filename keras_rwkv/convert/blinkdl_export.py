"""A model made or tuned here, back to a BlinkDL RWKV6 `.pth`.

The file loads in BlinkDL's tools (`rwkv` pip package, ChatRWKV,
RWKV-PEFT, RWKV-Runner) and in `keras-rwkv convert`. It is written
without torch (`pth_writer.py`), atomically.
"""

import os

from keras_rwkv.convert import blinkdl
from keras_rwkv.convert.pth_writer import save_torch_checkpoint
from keras_rwkv.convert.rwkv_peft import tuned_time_state


def export_blinkdl(model, path, dtype=None, drop_time_shift=False):
    """Writes an `RWKV6Backbone` (or the backbone of an `RWKV6CausalLM`)
    as a BlinkDL RWKV6 `.pth`.

    LoRA adapters are merged into their kernels. A tuned initial WKV state
    is stored as `blocks.{i}.att.time_state` (RWKV-PEFT's format, which
    BlinkDL's `rwkv` applies); tuned token-shift states have no place in
    it, so they need `drop_time_shift=True`.

    Args:
        model: an `RWKV6Backbone` or `RWKV6CausalLM`, not quantized.
        path: the `.pth` file to write (replaced atomically).
        dtype: `"bfloat16"`, `"float16"` or `"float32"`; default the
            model's variable dtype.
        drop_time_shift: leave tuned token-shift states out.

    Returns:
        The path written.

    Examples:
    ```python
    lm.enable_lora(rank=8); lm.fit(texts)
    keras_rwkv.convert.export_blinkdl(lm, "RWKV-x060-mine.pth")
    # then: RWKV(model="RWKV-x060-mine", strategy="cuda bf16")
    ```
    """
    backbone = getattr(model, "backbone", model)
    modes = {
        layer.quantization_mode
        for layer in backbone._flatten_layers()
        if getattr(layer, "quantization_mode", None)
    }
    if modes:
        raise ValueError(
            f"This model is quantized ({', '.join(sorted(modes))}); BlinkDL "
            ".pth files hold float weights. Export the model before "
            "quantize()."
        )
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={dtype!r}: use bfloat16, float16 or float32.")
    weights = blinkdl.state_dict(backbone, dtype)
    if backbone.tuned_state is not None:
        weights.update(tuned_time_state(backbone, drop_time_shift))
    return save_torch_checkpoint(weights, os.fspath(path))
