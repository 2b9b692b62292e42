"""Sharding and vmap rules for the WKV6 FFI calls (JAX).

An FFI call is opaque to XLA: left alone, the SPMD partitioner gathers
sharded inputs and runs the whole op on every device, and `vmap` can only
loop. Every WKV6 operand is independent over batch and heads, so
`batch_head_op` wraps a per-shard function so that

- under `jit` with sharded inputs (`keras.distribution`, `shard_map`-free
  `NamedSharding`s) each device runs it on its own batch rows and heads
  (`custom_partitioning` with a Shardy rule; the time and channel axes are
  gathered if someone shards them);
- under `vmap` the mapped axis is folded into the batch when the per-head
  operands (`u`) are shared, and looped over with `lax.map` when not.

Operands are described by layouts: space-separated factor names, where
"b" is the batch and "h" the heads; every other factor must be whole on
each device.
"""

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

SPLIT_FACTORS = ("b", "h")


def _split_axes(sharding, layout):
    """Mesh axes of `sharding` over the "b" and "h" dims of `layout`."""
    spec = tuple(sharding.spec) + (None,) * len(layout)
    return {f: spec[i] for i, f in enumerate(layout) if f in SPLIT_FACTORS}


def _partitioned(fn, in_layouts, out_layouts):
    in_layouts = [layout.split() for layout in in_layouts]
    out_layouts = [layout.split() for layout in out_layouts]

    def shardings(mesh, arg_shapes):
        # The first operand decides; the partitioner reshards the others.
        first = arg_shapes[0].sharding
        axes = (
            _split_axes(first, in_layouts[0])
            if isinstance(first, NamedSharding)
            else {}
        )

        def named(layout):
            return NamedSharding(
                mesh, PartitionSpec(*(axes.get(f) for f in layout))
            )

        return (
            tuple(named(layout) for layout in out_layouts),
            tuple(named(layout) for layout in in_layouts),
        )

    def partition(mesh, arg_shapes, result_shape):
        out_shardings, in_shardings = shardings(mesh, arg_shapes)
        return mesh, fn, out_shardings, in_shardings

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[0]

    wrapped = custom_partitioning(fn)
    # Factors in order of first appearance: Shardy wants them sorted so.
    factors = list(
        dict.fromkeys(f for layout in in_layouts + out_layouts for f in layout)
    )
    rule = (
        ", ".join(" ".join(layout) for layout in in_layouts)
        + " -> "
        + ", ".join(" ".join(layout) for layout in out_layouts)
    )
    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=rule,
        need_replication_factors=tuple(
            f for f in factors if f not in SPLIT_FACTORS
        ),
    )
    return wrapped


def _fold(x, batched, axis_size):
    """[V, B, ...] (or [B, ...] shared by all V) -> [V * B, ...]."""
    if not batched:
        x = jax.numpy.broadcast_to(x, (axis_size, *x.shape))
    return x.reshape((axis_size * x.shape[1], *x.shape[2:]))


def batch_head_op(fn, in_layouts, out_layouts):
    """`fn` made shardable over batch and heads, and vmappable.

    Args:
        fn: a function of arrays returning a tuple of arrays, computing
            each batch row and head independently of the others.
        in_layouts, out_layouts: one layout string per operand / result,
            e.g. `"b t h n"`; results must all start with "b".

    Returns:
        A function with `fn`'s signature.
    """
    inner = _partitioned(fn, in_layouts, out_layouts)
    has_batch = [layout.split()[0] == "b" for layout in in_layouts]

    @jax.custom_batching.custom_vmap
    def op(*args):
        return inner(*args)

    @op.def_vmap
    def op_vmap(axis_size, in_batched, *args):
        if all(
            has_b or not batched
            for has_b, batched in zip(has_batch, in_batched)
        ):
            folded = [
                _fold(x, batched, axis_size) if has_b else x
                for x, has_b, batched in zip(args, has_batch, in_batched)
            ]
            outs = op(*folded)
            outs = tuple(
                y.reshape((axis_size, y.shape[0] // axis_size, *y.shape[1:]))
                for y in outs
            )
        else:
            # A per-head operand differs along the mapped axis: loop.
            stacked = [
                x
                if batched
                else jax.numpy.broadcast_to(x, (axis_size, *x.shape))
                for x, batched in zip(args, in_batched)
            ]
            outs = jax.lax.map(lambda a: op(*a), stacked)
        return tuple(outs), (True,) * len(outs)

    return op
