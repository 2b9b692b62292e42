"""Official RWKV6 World model shapes (DESIGN.md), shared by the benchmarks."""

RWKV6_1B6 = dict(
    vocabulary_size=65536,
    num_layers=24,
    hidden_dim=2048,
    intermediate_dim=7168,
    head_size=64,
    mix_lora_dim=32,
    decay_lora_dim=64,
)

RWKV6_7B = dict(
    RWKV6_1B6,
    num_layers=32,
    hidden_dim=4096,
    intermediate_dim=14336,
    mix_lora_dim=64,
    decay_lora_dim=128,
)
