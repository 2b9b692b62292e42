"""The `keras.distribution.LayoutMap` of `RWKV6Backbone.get_layout_map`
(its docstring says what is split how, and why)."""

import keras


def layout_map(device_mesh, model_dim="model", data_dim="batch"):
    """The layout map for `device_mesh`: Megatron-style splits over
    `model_dim`, FSDP-like over `data_dim` (or none if it is None)."""
    # Weight paths and shapes (1.6B: C=2048, F=7168, V=65536):
    # token_embedding/embeddings              (V, C)
    # token_embedding/reverse_embeddings      (C, V)  the untied head
    # block_i/time_mix/{receptance,key,value,gate}/kernel  (C, C)
    # block_i/time_mix/output/kernel          (C, C)
    # block_i/channel_mix/key/kernel          (C, F)
    # block_i/channel_mix/receptance/kernel   (C, C)
    # block_i/channel_mix/value/kernel        (F, C)
    # .../lora_kernel_a (in, rank), .../lora_kernel_b (rank, out)
    # block_i/initial_wkv (H, N, N), block_i/initial_shift (2, C)
    # and vectors / small LoRA matrices of the token shift and decay.
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "Invalid device_mesh type. Expected "
            f"`keras.distribution.DeviceMesh`, got {type(device_mesh)}"
        )
    for name in (model_dim, data_dim):
        if name is not None and name not in device_mesh.axis_names:
            raise ValueError(
                f"{name} is not found in the device_mesh.axis_names: "
                f"{device_mesh.axis_names}"
            )
    # Column-parallel (output channels over the model axis) and
    # row-parallel (input channels over the model axis) kernels. The
    # data axis on the other dimension is the FSDP part.
    column = (data_dim, model_dim)
    row = (model_dim, data_dim)
    layouts = keras.distribution.LayoutMap(device_mesh)
    # Embedding rows and head columns by vocabulary (vocab-parallel).
    layouts["token_embedding/embeddings"] = row
    layouts["token_embedding/reverse_embeddings"] = column
    prefix = r"(.*/)?block_\d+/"
    kernels = {
        r"time_mix/(receptance|key|value|gate)/": column,
        r"time_mix/output/": row,
        r"channel_mix/(key|receptance)/": column,
        r"channel_mix/value/": row,
    }
    for layer, (in_axis, out_axis) in kernels.items():
        layouts[prefix + layer + "kernel"] = (in_axis, out_axis)
        # LoRA: kernel + a @ b keeps the kernel's layout when `a` is
        # split like its input dim and `b` like its output dim.
        layouts[prefix + layer + "lora_kernel_a"] = (in_axis, None)
        layouts[prefix + layer + "lora_kernel_b"] = (None, out_axis)
    # The ChannelMix output (and so the residual stream) whole on every
    # model shard. Left free, the partitioner keeps it split by channel
    # like the column-parallel receptance it is multiplied with, and
    # then every layer norm and projection gathers it back: 6 gathers a
    # layer instead of one, which made 2-GPU decoding slower than one.
    layouts[prefix + "channel_mix/output"] = (data_dim, None, None)
    return layouts
