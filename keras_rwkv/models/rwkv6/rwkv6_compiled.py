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


def compile_for_backend(lm, fn):
    """`fn(*tensors)` as a callable for `lm`'s backend (see the module
    docstring)."""
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

    @jax.jit
    def compiled(variables, *args):
        sampler_v, trainable_v, non_trainable_v = variables
        mapping = itertools.chain(
            zip(sampler_vars, sampler_v),
            zip(lm.trainable_variables, trainable_v),
            zip(lm.non_trainable_variables, non_trainable_v),
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
        variables = (
            [v.value for v in sampler_vars],
            [v.value for v in lm.trainable_variables],
            [v.value for v in lm.non_trainable_variables],
        )
        out, new_sampler_v = compiled(variables, *_shard_batch(args))
        for ref, value in zip(sampler_vars, new_sampler_v):
            ref.assign(value)
        return out

    return run


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
