"""Every file format the project reads or writes, in one place (no format is parsed twice)."""
from .activations import activation_path, load_activations, save_activations
from .predictors import load_predictors, save_predictors
from .gguf import GGUFFile, TensorSpec, read_gguf, write_gguf
from .gpuidx import read_gpuidx, write_gpuidx
