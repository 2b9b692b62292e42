"""CUDA sources of the decoding-step matrix-vector products (built by
`keras_rwkv.ops.wkv6.cuda.build`, flavour "matvec_jax")."""
