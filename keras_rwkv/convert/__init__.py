"""Checkpoint conversion into KerasHub presets."""

from keras_rwkv.convert.blinkdl import detect_rwkv_version
from keras_rwkv.convert.blinkdl_export import export_blinkdl
from keras_rwkv.convert.convert_checkpoint import convert_checkpoint
from keras_rwkv.convert.preset_writer import PresetWriteError
from keras_rwkv.convert.preset_writer import write_preset
from keras_rwkv.convert.pth_writer import save_torch_checkpoint
from keras_rwkv.convert.safetensors_file import load_safetensors
from keras_rwkv.convert.torch_checkpoint import CheckpointError
from keras_rwkv.convert.torch_checkpoint import UnsafeCheckpointError
from keras_rwkv.convert.torch_checkpoint import load_torch_checkpoint

__all__ = [
    "CheckpointError",
    "PresetWriteError",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "detect_rwkv_version",
    "export_blinkdl",
    "load_safetensors",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
    "write_preset",
]
