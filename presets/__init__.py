"""Preset manifests shipped with keras_rwkv (installed as
`keras_rwkv.presets`): JSON files naming each preset's source and config."""
