"""The compiled torch decoding step (`rwkv6_torch_step.py`): the same
logits and state as the eager step, one program per batch size, weights
assigned later seen, and a step that cannot be traced decoding eagerly
with one warning. Runs in the torch pass."""

import warnings

import keras
import numpy as np
import pytest

from keras_rwkv import RWKV6Backbone
from keras_rwkv import RWKV6CausalLM
from keras_rwkv.models.rwkv6.rwkv6_torch_step import step_function

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch", reason="the torch step"
)

TINY = dict(
    vocabulary_size=300,
    num_layers=2,
    hidden_dim=128,
    intermediate_dim=256,
    head_size=64,
    mix_lora_dim=32,
    decay_lora_dim=64,
)


@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(0)
    return RWKV6CausalLM(RWKV6Backbone(**TINY))


def state_after(lm, ids):
    import torch

    with torch.no_grad():
        ids = torch.as_tensor(ids, dtype=torch.int32)
        _, _, state = lm.call_with_state(ids, torch.ones_like(ids), None)
    return state.layers()


def close(a, b):
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(a),
        keras.ops.convert_to_numpy(b),
        rtol=1e-5,
        atol=1e-5,
    )


def test_compiled_step_matches_eager_and_sees_assigned_weights(lm):
    import torch

    lm.compile(sampler="greedy", jit_compile=True)
    step = step_function(lm)
    rng = np.random.default_rng(0)
    for batch in (1, 3, 1):
        layers = state_after(lm, rng.integers(1, 300, (batch, 5)))
        ids = torch.as_tensor(
            rng.integers(1, 300, (batch, 1)), dtype=torch.int32
        )
        mask = torch.tensor([[1]] * (batch - 1) + [[0]], dtype=torch.int32)
        with torch.no_grad():
            want, _, want_state = lm.call_with_state(ids, mask, layers)
        got, _, got_state = step(ids, mask, layers)
        close(got, want)
        for got_layer, want_layer in zip(got_state, want_state):
            for g, w in zip(got_layer, want_layer):
                close(g, w)
    programs = [k for k in lm._compiled_functions if k[0] == "torch_step"]
    assert len(programs) == 2  # batch 1 and 3; the second batch 1 reused

    # A weight assigned after the program was built is used by it.
    kernel = lm.backbone.transformer_layers[0].time_mix.output_dense.kernel
    before = step(ids, mask, layers)[0]
    kernel.assign(kernel.value * 2.0)
    with torch.no_grad():
        want = lm.call_with_state(ids, mask, layers)[0]
    got = step(ids, mask, layers)[0]
    close(got, want)
    assert not np.allclose(
        keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(before)
    )


def test_untraceable_step_decodes_eagerly_with_a_warning(lm, monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.export, "export", refuse)
    lm.compile(sampler="greedy", jit_compile=True)
    ids = np.array([[5, 6, 7]], "int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    with pytest.warns(UserWarning, match="running it eagerly"):
        got = lm.generate(inputs, max_new_tokens=4, stop_token_ids=None)
    lm.compile(sampler="greedy")
    want = lm.generate(inputs, max_new_tokens=4, stop_token_ids=None)
    np.testing.assert_array_equal(got["token_ids"], want["token_ids"])


def generate_both_ways(lm, inputs):
    """`(compiled, eager)` generations (tokens and state), with no eager
    fallback or graph-less run allowed in the compiled one."""
    outputs = {}
    for jit in (True, False):
        lm.compile(sampler="greedy", jit_compile=jit)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "keras_rwkv: could not")
            outputs[jit] = lm.generate(
                inputs, max_new_tokens=5, stop_token_ids=None, return_state=True
            )
    return outputs[True], outputs[False]


def assert_same_generation(got, want, tolerance=1e-5):
    (got, got_state), (want, want_state) = got, want
    np.testing.assert_array_equal(got["token_ids"], want["token_ids"])
    for a, b in (
        (got_state.wkv, want_state.wkv),
        (got_state.shift, want_state.shift),
    ):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            rtol=tolerance,
            atol=tolerance,
        )


def test_graph_mode_decodes_like_eager(lm, monkeypatch):
    """The CUDA-graph mode: the step reads the token and mask from its
    own buffers, updates the state in place and leaves its logits in the
    capture's output, which every replay rewrites. On the CPU a stand-in
    for the graph runs the captured work again at each replay (the real
    capture is tested on a GPU below)."""
    captures = stand_in_graphs(monkeypatch)
    ids = np.array([[5, 6, 7], [0, 8, 9]], "int32")
    inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    assert_same_generation(*generate_both_ways(lm, inputs))
    assert sorted(captures) == ["decoding step", "prompt's read"]


def stand_in_graphs(monkeypatch):
    """CUDA graphs on the CPU: a stand-in capture whose replay runs the
    captured work again and writes its outputs into the capture's. Returns
    the list of what was captured."""
    from keras_rwkv.models.rwkv6 import rwkv6_torch_step

    captures = []

    def capture(run, what="decoding step", pool=None):
        outputs = run()
        captures.append(what)

        def replay():
            keras.tree.map_structure(
                lambda own, new: own.copy_(new), outputs, run()
            )

        return replay, outputs

    monkeypatch.setattr(rwkv6_torch_step, "_on_gpu", lambda tensor: True)
    monkeypatch.setattr(rwkv6_torch_step, "capture_graph", capture)
    monkeypatch.setattr(rwkv6_torch_step, "_graph_pool", lambda: "pool")
    return captures


def test_the_read_as_a_graph_reads_like_eager_into_states_of_its_own(
    lm, monkeypatch
):
    """The prompt's read replayed as a graph over buffers of its own: the
    same states as eager, from zeros and from a state, and each call's
    state a copy (the next replay does not change it)."""
    captures = stand_in_graphs(monkeypatch)
    rng = np.random.default_rng(3)
    prompts = []
    for _ in range(2):
        ids = rng.integers(1, 300, (2, 7)).astype("int32")
        ids[1, :3] = 0
        prompts.append(
            {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
        )
    lm.compile(sampler="greedy", jit_compile=True)
    first = lm.prefill(prompts[0])
    second = lm.prefill(prompts[1])
    continued = lm.prefill(prompts[1], state=first)
    assert sorted(captures) == ["prompt's read"] * 2  # from zeros, a state
    lm.compile(sampler="greedy")
    for got, want in (
        (first, lm.prefill(prompts[0])),
        (second, lm.prefill(prompts[1])),
        (continued, lm.prefill(prompts[1], state=lm.prefill(prompts[0]))),
    ):
        close(got.wkv, want.wkv)
        close(got.shift, want.shift)


def test_cuda_graph_decodes_like_eager_on_a_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    keras.utils.set_random_seed(0)
    lm = RWKV6CausalLM(RWKV6Backbone(**TINY))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, (3, 6)).astype("int32")
    ids[1, :2] = 0
    inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    assert_same_generation(*generate_both_ways(lm, inputs), tolerance=1e-4)


def test_the_traced_read_matches_eager_and_sees_assigned_weights(lm):
    """The prompt's read under `jit_compile=True` (a traced program per
    shape): the same state as eager from zeros and from a given state,
    one program per shape, and weights assigned later used."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 300, (2, 9)).astype("int32")
    ids[0, :4] = 0  # a shorter, left-padded row
    inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}

    def both(state=None):
        states = []
        for jit in (True, False):
            lm.compile(sampler="greedy", jit_compile=jit)
            with warnings.catch_warnings():
                warnings.filterwarnings("error", "keras_rwkv: could not")
                states.append(lm.prefill(inputs, state=state))
        return states

    def assert_close(got, want):
        close(got.wkv, want.wkv)
        close(got.shift, want.shift)

    lm.compile(sampler="greedy", jit_compile=True)
    start, _ = both()
    assert_close(start, _)
    assert_close(*both(state=start))
    lm.compile(sampler="greedy", jit_compile=True)
    for _ in range(2):
        lm.prefill(inputs)
    reads = [k for k in lm._compiled_functions if k[0] == "torch_read"]
    assert len(reads) == 1

    kernel = lm.backbone.transformer_layers[0].channel_mix.value.kernel
    before = lm.prefill(inputs)
    kernel.assign(kernel.value * 2.0)
    got = lm.prefill(inputs)
    lm.compile(sampler="greedy")
    assert_close(got, lm.prefill(inputs))
    assert not np.allclose(
        keras.ops.convert_to_numpy(got.wkv),
        keras.ops.convert_to_numpy(before.wkv),
    )


def test_a_bad_mode_is_named(lm, monkeypatch):
    monkeypatch.setenv("KERAS_RWKV_TORCH_STEP_MODE", "fast")
    lm.compile(sampler="greedy", jit_compile=True)
    ids = np.array([[5, 6, 7]], "int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    with pytest.raises(ValueError, match="KERAS_RWKV_TORCH_STEP_MODE='fast'"):
        lm.generate(inputs, max_new_tokens=2, stop_token_ids=None)
    lm.compile(sampler="greedy")


def test_the_loop_reads_the_device_every_few_steps(lm, monkeypatch):
    """No host read of a device value each step (each is a sync on a GPU):
    the column index stays on the host and whether all rows ended is read
    every `CHECK_EVERY` steps."""
    import torch

    lm.compile(sampler="greedy")
    ids = np.array([[5, 6, 7], [0, 8, 9]], "int32")
    inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    lm.generate(inputs, max_new_tokens=4, stop_token_ids=None)
    reads = []
    as_bool = torch.Tensor.__bool__

    def counted(tensor):
        reads.append(1)
        return as_bool(tensor)

    monkeypatch.setattr(torch.Tensor, "__bool__", counted)
    counts = {}
    for new in (8, 40):
        reads.clear()
        lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)
        counts[new] = len(reads)
    # 32 more tokens: at most one read every 8 steps, and one more.
    assert counts[40] - counts[8] <= 32 // 8 + 1, counts
    assert counts[8] <= 4, counts


@pytest.mark.parametrize("penalties", [False, True])
def test_the_compiled_loop_copies_nothing_to_the_device_a_step(
    lm, monkeypatch, penalties
):
    """Around the compiled step, the loop (and the repetition penalties,
    every option on) gives its ops tensors made once: a host number or
    array given to an op is a copy to the device (and a wait for it) each
    step."""
    import torch

    from keras_rwkv.samplers import PenaltySampler

    sampler = "greedy"
    if penalties:
        sampler = PenaltySampler(
            "greedy",
            repetition_penalty=1.3,
            penalty_window=16,
            max_penalty_range=(1, 4),
            presence_penalty=0.4,
            frequency_penalty=0.2,
            penalty_decay=0.99,
            token_ban=(3,),
            unweighted_ids=(5, 6),
        )
    lm.compile(sampler=sampler, jit_compile=True)
    ids = np.array([[5, 6, 7], [0, 8, 9]], "int32")
    inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    stops = (299,)  # in the loop's ops, never met
    lm.generate(inputs, max_new_tokens=40, stop_token_ids=stops)
    copies = []
    as_tensor = torch.as_tensor

    def counted(data, *args, **kwargs):
        if not isinstance(data, torch.Tensor):
            copies.append(type(data).__name__)
        return as_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", counted)
    made = torch.tensor

    def counted_tensor(data, *args, **kwargs):
        if not isinstance(data, torch.Tensor):
            copies.append(f"tensor({type(data).__name__})")
        return made(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counted_tensor)
    counts = {}
    for new in (8, 40):
        copies.clear()
        lm.generate(inputs, max_new_tokens=new, stop_token_ids=stops)
        counts[new] = list(copies)
    # The same copies for 8 tokens as for 40: none of them a step's.
    assert counts[40] == counts[8], counts


def test_eager_unless_asked(lm):
    lm.compile(sampler="greedy")
    assert step_function(lm) == lm.call_with_state


def test_a_backbone_quantized_later_gets_a_new_program():
    import torch

    keras.utils.set_random_seed(1)
    lm = RWKV6CausalLM(RWKV6Backbone(**TINY))
    lm.compile(sampler="greedy", jit_compile=True)
    step = step_function(lm)
    layers = state_after(lm, [[3, 4, 5]])
    ids = torch.tensor([[7]], dtype=torch.int32)
    mask = torch.ones_like(ids)
    step(ids, mask, layers)
    lm.backbone.quantize("int8")  # not through the task: its programs stay
    with torch.no_grad():
        want = lm.call_with_state(ids, mask, layers)[0]
    close(step(ids, mask, layers)[0], want)
    programs = [k for k in lm._compiled_functions if k[0] == "torch_step"]
    assert len(programs) == 2


def test_beam_search_decodes_through_the_program_like_eager(lm):
    """Beam search (KerasHub's own loop, the state reordered by beam each
    step) through the compiled step: the same beams as eagerly, with
    `return_state` too."""
    from keras_hub.samplers import BeamSampler

    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], "int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    outputs = {}
    for jit in (False, True):
        lm.compile(sampler=BeamSampler(num_beams=3), jit_compile=jit)
        outputs[jit] = lm.generate(
            inputs, max_new_tokens=6, stop_token_ids=None, return_state=True
        )
    programs = [k for k in lm._compiled_functions if k[0] == "torch_step"]
    assert [k[1] for k in programs] == [(6, 1)]  # 2 rows x 3 beams
    (eager, eager_state), (got, got_state) = outputs[False], outputs[True]
    np.testing.assert_array_equal(got["token_ids"], eager["token_ids"])
    np.testing.assert_array_equal(got["padding_mask"], eager["padding_mask"])
    close(got_state.wkv, eager_state.wkv)
    close(got_state.shift, eager_state.shift)
