"""Model conversion: Hugging Face checkpoints to PowerInfer sparse GGUF or plain llama.cpp GGUF."""
from .hf_to_gguf import OUTTYPES, convert
