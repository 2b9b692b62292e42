"""The programs `RWKV6CausalLM` runs to read prompts and decode: compiled
once per shape for the backend, with the batch spread over a
`keras.distribution`.

On JAX a function becomes one `jax.jit` program with the model's and the
sampler's variables passed in, as KerasHub's own JAX generate does (the
sampler may update its variables, e.g. a seed). The batch of every array
argument is split over the data-parallel devices, and with a mesh over
several processes every output is made whole on each host. torch runs
eagerly without autograd; TensorFlow runs eagerly.
"""

import itertools

import keras

from keras_rwkv.keras_hub_shim import lora_layer_count


def compile_for_backend(lm, fn, frozen_weights=False):
    """`fn(*tensors)` as a callable for `lm`'s backend (see the module
    docstring). With `frozen_weights`, the weights' values are taken at
    the first call and reused (a server's model does not change while it
    serves; reading ~600 variables costs ~1.5 ms a call)."""
    backend = keras.config.backend()
    if backend == "torch":
        import torch

        def run(*args):
            with torch.no_grad():
                return fn(*args)

        return run
    if backend != "jax" or lm.run_eagerly:
        return fn
    import jax

    sampler_vars = lm.sampler.variables if lm.sampler else []
    # Collecting a model's variables walks every layer (~6 ms each list
    # for the 1.6B, more than a decoding step), so the lists are kept,
    # and taken again only when the model's variables may have changed.
    taken = {}

    def model_variables():
        mark = variables_mark(lm)
        if taken.get("mark") != mark:
            taken.pop("values", None)  # frozen values of other variables
            taken.update(
                mark=mark,
                trainable=list(lm.trainable_variables),
                non_trainable=list(lm.non_trainable_variables),
            )
        return taken["trainable"], taken["non_trainable"]

    @jax.jit
    def compiled(variables, *args):
        sampler_v, trainable_v, non_trainable_v = variables
        trainable, non_trainable = model_variables()
        mapping = itertools.chain(
            zip(sampler_vars, sampler_v),
            zip(trainable, trainable_v),
            zip(non_trainable, non_trainable_v),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            out = _replicate_over_processes(fn(*args))
        new_sampler_v = [
            scope.get_current_value(v)
            if scope.get_current_value(v) is not None
            else v.value
            for v in sampler_vars
        ]
        return out, new_sampler_v

    def run(*args):
        trainable, non_trainable = model_variables()
        if "values" in taken:
            weights = taken["values"]
        else:
            weights = (
                [v.value for v in trainable],
                [v.value for v in non_trainable],
            )
            if frozen_weights:
                taken["values"] = weights
        variables = ([v.value for v in sampler_vars], *weights)
        out, new_sampler_v = compiled(variables, *_shard_batch(args))
        for ref, value in zip(sampler_vars, new_sampler_v):
            ref.assign(value)
        return out

    return run


def variables_mark(lm):
    """What changes when variables are added or replaced, cheap to read:
    LoRA (KerasHub's `enable_lora` list), state tuning, quantization (of
    the first projection and the embedding), trainable flags of the
    backbone. `compile`, `quantize` and `enable_state_tuning` on the task
    drop its programs anyway; this catches the same done on the backbone."""
    backbone = lm.backbone
    first = backbone.transformer_layers[0].time_mix.receptance
    return (
        lora_layer_count(backbone),
        backbone.tuned_state,
        first.quantization_mode,
        first.lora_enabled,
        backbone.token_embedding.quantization_mode,
        backbone.trainable,
    )


def _replicate_over_processes(outputs):
    """Inside the jitted program: when the mesh spans several processes,
    makes every output whole on every device, so each host can read it
    (the rows may have been decoded on other hosts)."""
    import jax

    distribution = keras.distribution.distribution()
    if distribution is None or jax.process_count() == 1:
        return outputs
    replicated = jax.sharding.NamedSharding(
        distribution.device_mesh.backend_mesh, jax.sharding.PartitionSpec()
    )
    return keras.tree.map_structure(
        lambda x: (
            jax.lax.with_sharding_constraint(x, replicated)
            if hasattr(x, "shape")
            else x
        ),
        outputs,
    )


def _shard_batch(args):
    """Splits the batch (leading) dim of the array arguments over the
    data-parallel devices of the current `keras.distribution`, as
    KerasHub's `generate` does, so each device decodes its own rows. Arrays
    whose batch does not divide evenly (and scalars) stay replicated, and
    so does everything when the mesh spans several processes (the outputs
    must be readable on every host)."""
    import jax

    distribution = keras.distribution.distribution()
    if distribution is None or jax.process_count() > 1:
        return args

    def shard(x):
        shape = getattr(x, "shape", ())
        if len(shape) == 0:
            return x
        layout = distribution.get_data_layout(shape)
        axis = None if layout is None else layout.axes[0]
        if axis is None:
            return x
        mesh = layout.device_mesh
        if shape[0] % mesh.shape[mesh.axis_names.index(axis)]:
            return x
        return keras.distribution.distribute_tensor(x, layout)

    return tuple(
        keras.tree.map_structure(shard, a) if a is not None else None
        for a in args
    )
