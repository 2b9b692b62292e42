"""The one-token decoding step on torch as one compiled program, and the
prompt's read as one traced program.

Eager torch runs a step of a Keras model as thousands of small ops, each
behind Keras's Python dispatch, so a batch-1 step is host-bound
(benchmarks/RESULTS.md, "torch decode"). With `lm.compile(jit_compile=True)`
on torch (Keras's own switch for `torch.compile`, off by default there),
`generate` runs each step through a program built once per batch size:
`torch.export` traces `call_with_state` for one token (no Keras code is
left in it, so no guards over Keras layers run per step), then
`torch.compile` compiles the traced graph. The weights stay references to
the model's own tensors, so values assigned later (training) are used;
quantizing, LoRA and state tuning (on the task or the backbone) make a
new program.

The program keeps the state in buffers of its own and updates them in
place, so a step allocates nothing and copies nothing out; the decoding
loop hands the returned state back unchanged (any other state is copied
in first), and `RWKV6State.from_layers` copies it out at the end. On a
GPU the step is one CUDA graph, captured by us around the compiled
program, with the token and mask in buffers too: a step is two small
copies and one replay, with none of torch.compile's per-call Python
(guards, input checks, cudagraph trees' bookkeeping), which cost more
than the step itself (benchmarks/RESULTS.md, "torch decode on one H200").
`KERAS_RWKV_TORCH_STEP_MODE` (`reduce-overhead`, the GPU default: CUDA
graph; `max-autotune`: the same over inductor's autotuned kernels;
`default` and `max-autotune-no-cudagraphs`: no graph) overrides it.

The prompt's read (`read_function`) is traced the same way once per
shape and run as the traced graph of torch ops, without compiling it
further (that would cost each prompt length what a step's compile costs):
Keras's dispatch around each op is what made it slow. On a GPU (in the
graph modes) the traced read replays as a CUDA graph captured at its
first call (a one-token generate of the 1.6B on an H100: 29.5 ms).

Where tracing or compiling fails, the step or read runs eagerly with one
warning; where only the graph fails, the compiled program runs without it.
"""

import warnings

import keras

from keras_rwkv.models.rwkv6.rwkv6_compiled import variables_mark
from keras_rwkv.models.rwkv6.rwkv6_state import RWKV6State
from keras_rwkv.utils import settings


def step_function(lm):
    """`lm.call_with_state`, or (torch with `jit_compile=True`) the same
    step through its compiled program, for one-token steps whose state is
    the per-layer list the decoding loop carries. The state it returns
    may be the program's own buffers, overwritten by its next step: pass
    it back, or copy it, but do not keep it."""
    if not compiling(lm):
        return lm.call_with_state

    # The program is looked up again only when the batch's shape or the
    # variables' mark changes (a quantize or LoRA on the backbone alone:
    # the task's own drop every program), not over the state each step.
    found = {"seen": None, "key": None, "program": None}

    def step(token_ids, padding_mask, state):
        if not isinstance(state, list) or token_ids.shape[1] != 1:
            return lm.call_with_state(token_ids, padding_mask, state)
        seen = (tuple(token_ids.shape), variables_mark(lm))
        if found["seen"] != seen:
            key = ("torch_step", *seen, _signature(state))
            if key not in lm._compiled_functions:
                lm._compiled_functions[key] = _build(
                    lm, token_ids, padding_mask, state
                )
            found.update(
                seen=seen, key=key, program=lm._compiled_functions[key]
            )
        program = found["program"]
        if program is EAGER:
            return lm.call_with_state(token_ids, padding_mask, state)
        try:
            logits, layers = program(token_ids, padding_mask, state)
        except Exception as error:  # compiling happens at the first call
            lm._compiled_functions[found["key"]] = found["program"] = EAGER
            warn_eager(error)
            return lm.call_with_state(token_ids, padding_mask, state)
        return logits, None, layers

    return step


def read_function(lm, fn):
    """`fn(ids, state) -> RWKV6State`, the read of left-padded prompts
    (-1 for pads) from an `RWKV6State` or None, or (torch with
    `jit_compile=True`) the same through a program traced once per shape:
    `torch.export`'s graph of torch ops, run as it is (on a GPU, replayed
    as a CUDA graph). Not compiled further: that would cost each prompt
    length what the step's compile costs. Eagerly, torch reads a prompt
    as thousands of Keras ops (~200 ms for the 1.6B on an H200, most of a
    short generation's time)."""
    if not compiling(lm):
        return fn

    def read(ids, state):
        ids = keras.ops.convert_to_tensor(ids, "int32")
        layers = None if state is None else state.layers()
        key = (
            "torch_read",
            tuple(ids.shape),
            variables_mark(lm),
            None if layers is None else _signature(layers),
        )
        if key not in lm._compiled_functions:
            graph = _on_gpu(ids) and (
                settings.torch_step_mode(True) in _GRAPH_MODES
            )
            if graph:  # the reads' graphs share one memory pool
                graph = lm._compiled_functions.setdefault(
                    ("torch_read_pool",), _graph_pool()
                )
            lm._compiled_functions[key] = _trace(fn, ids, layers, graph)
        program = lm._compiled_functions[key]
        if program is not EAGER:
            try:
                new = program(ids, layers)  # as `fn` gives it
                if isinstance(new, RWKV6State):
                    return new
                return RWKV6State.from_layers(new)
            except Exception as error:
                lm._compiled_functions[key] = EAGER
                warn_eager(error, "read")
        return fn(ids, state)

    return read


def compiling(lm):
    """Whether `lm` runs its own torch programs: torch, `jit_compile`."""
    return (
        keras.config.backend() == "torch"
        and getattr(lm, "jit_compile", False) is True
    )


def _graph_pool():
    import torch

    return torch.cuda.graph_pool_handle()


def _trace(fn, ids, layers, graph):
    """`fn(ids, layers)` run as its exported graph (with `graph`, a CUDA
    graphs' memory pool, replayed as a CUDA graph), or `EAGER`."""
    import torch

    try:
        module = without_no_op_casts(export(fn, ids, layers))
    except Exception as error:
        warn_eager(error, "read")
        return EAGER

    def run(ids, layers):
        with torch.no_grad():
            return module(ids, layers)

    return _Replayed(run, graph) if graph else run


class _Replayed:
    """`run(ids, layers)` as a CUDA graph over input buffers of its own,
    captured at the first call; each call copies its inputs in, replays,
    and returns copies of the outputs (the next replay rewrites them). A
    graph's launch replaces the read's ~5,000 ops' host work. Where the
    capture fails, `run` runs as it is. The graphs of a model's reads
    share `pool`: none runs while another's outputs are in use, as each
    call copies its outputs out at once."""

    def __init__(self, run, pool):
        self.run = run
        self.pool = pool
        self.replay = self.inputs = self.outputs = None
        self.captured = False

    def __call__(self, ids, layers):
        import torch

        with torch.no_grad():
            if not self.captured:
                self.captured = True
                self.inputs = (ids.clone(), _cloned(layers))
                self.replay, self.outputs = capture_graph(
                    lambda: self.run(*self.inputs), "prompt's read", self.pool
                )
            if self.replay is None:
                return self.run(ids, layers)
            self.inputs[0].copy_(ids)
            for own, given in zip(self.inputs[1] or (), layers or ()):
                for a, b in zip(own, given):
                    a.copy_(b)
            self.replay()
            return _cloned(self.outputs)


def without_no_op_casts(module):
    """`module` without its casts to the dtype a tensor already has, and
    their metadata checks: Keras casts freely, and run as a graph each is
    a Python call (~7,000 of a 24-layer read's ~11,700 nodes)."""
    import torch

    aten = torch.ops.aten
    graph = module.graph
    for node in list(graph.nodes):
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif (
            node.target in (aten.to.dtype, aten.to.dtype_layout)
            and len(node.args) <= 2
            and not node.kwargs.get("copy", False)
            and node.kwargs.get("memory_format") is None
            and _same_tensor_type(node.args[0], node)
        ):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    module.recompile()
    return module


def _same_tensor_type(a, b):
    a, b = (getattr(n, "meta", {}).get("val") for n in (a, b))
    return (
        a is not None
        and b is not None
        and (a.dtype, a.device, a.layout) == (b.dtype, b.device, b.layout)
    )


def export(fn, *args, grad=False):
    """`fn(*args)` traced by `torch.export` into a module of torch ops
    (no Keras code left in it); weights not passed in stay references to
    the model's own tensors. With `grad`, traced for autograd to run
    through (training); else without it."""
    import torch

    class Traced(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    with torch.set_grad_enabled(grad):
        return torch.export.export(Traced(), args, strict=False).module()


# A program that could not be built: run eagerly.
EAGER = object()

# Our CUDA graph over torch.compile's mode without one.
_GRAPH_MODES = {
    "reduce-overhead": "default",
    "max-autotune": "max-autotune-no-cudagraphs",
}


def _signature(layers):
    return tuple(
        (tuple(t.shape), str(t.dtype), str(t.device))
        for layer in layers
        for t in layer
    )


def _build(lm, token_ids, padding_mask, layers):
    import torch

    def step(token_ids, padding_mask, layers):
        logits, _, new_layers = lm.call_with_state(
            token_ids, padding_mask, layers
        )
        return logits, new_layers

    # A bad setting is an error, not a warning.
    on_gpu = _on_gpu(token_ids)
    mode = settings.torch_step_mode(on_gpu)
    try:
        module = export(step, token_ids, padding_mask, layers)

        def step_in_place(token_ids, padding_mask, layers):
            logits, new_layers = module(token_ids, padding_mask, layers)
            for layer, new_layer in zip(layers, new_layers):
                for old, new in zip(layer, new_layer):
                    old.copy_(new)
            return logits

        compiled = torch.compile(
            step_in_place, dynamic=False, mode=_GRAPH_MODES.get(mode, mode)
        )
    except Exception as error:
        warn_eager(error)
        return EAGER
    return _Program(compiled, layers, graph=on_gpu and mode in _GRAPH_MODES)


def _on_gpu(tensor):
    return tensor.device.type == "cuda"


class _Program:
    """The compiled step over state buffers of its own (see the module
    docstring); with `graph`, replayed as one CUDA graph."""

    def __init__(self, compiled, layers, graph):
        import torch

        self.compiled = compiled
        self.layers = [
            tuple(torch.empty_like(t) for t in layer) for layer in layers
        ]
        self.graph = graph  # True until captured (or given up on)
        self.inputs = None
        self.logits = None

    def __call__(self, token_ids, padding_mask, layers):
        import torch

        with torch.no_grad():
            if layers is not self.layers:
                for layer, given in zip(self.layers, layers):
                    for own, new in zip(layer, given):
                        own.copy_(new)
            if self.graph is True:
                self.graph = self._capture(token_ids, padding_mask)
            if not self.graph:
                logits = self.compiled(token_ids, padding_mask, self.layers)
                return logits, self.layers
            self.inputs[0].copy_(token_ids)
            self.inputs[1].copy_(padding_mask)
            self.graph()
            return self.logits, self.layers

    def _capture(self, token_ids, padding_mask):
        """Our buffers' step as a CUDA graph's replay, or None where it
        cannot be captured. Leaves the state as it was: the warm-up steps
        run on it, and are undone."""
        self.inputs = (token_ids.clone(), padding_mask.clone())
        saved = [tuple(t.clone() for t in layer) for layer in self.layers]
        replay, self.logits = capture_graph(
            lambda: self.compiled(*self.inputs, self.layers)
        )
        for layer, kept in zip(self.layers, saved):
            for own, value in zip(layer, kept):
                own.copy_(value)
        return replay


def _cloned(layers):
    """A copy of per-layer state tuples (or of an `RWKV6State`), or None."""
    if layers is None:
        return None
    if isinstance(layers, RWKV6State):
        return RWKV6State(*(t.clone() for t in layers))
    return [tuple(t.clone() for t in layer) for layer in layers]


def capture_graph(run, what="decoding step", pool=None):
    """`run()`, CUDA work over fixed buffers, as a CUDA graph: returns
    `(replay, outputs)`, where `replay()` runs it again and `outputs` are
    the capture's outputs, which each replay rewrites. Where the capture
    fails, `replay` is None, with a warning.

    `run` is run twice first, on a side stream as CUDA graphs ask: the
    first run compiles, and lazy initialisation must not happen inside
    the capture. An error there is the compiler's, and is raised."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            outputs = run()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = run()
    except Exception as error:
        warnings.warn(
            f"keras_rwkv: could not capture the torch {what} as a "
            f"CUDA graph ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); running it without.",
            stacklevel=6,
        )
        return None, outputs
    return graph.replay, outputs


def warn_eager(error, what="decoding step"):
    warnings.warn(
        f"keras_rwkv: could not compile the torch {what} "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
        "running it eagerly. Compile without jit_compile=True to silence "
        "this.",
        stacklevel=4,
    )
