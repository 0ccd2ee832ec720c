"""Every file format the project reads or writes, in one place (no format is parsed twice)."""
from .activations import activation_path, load_activations, profiled_tokens, save_activations
from .predictors import load_predictors, save_predictors
from .gguf import GGUFFile, TensorSpec, load_gguf_checkpoint, read_gguf, read_gguf_config, write_gguf
from .gpuidx import default_gpuidx_path, read_gpuidx, write_gpuidx
from .hf import HF_TO_INTERNAL, HFTensors, iter_hf_tensors, read_hf_tensors
