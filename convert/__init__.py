"""Model conversion: Hugging Face checkpoints to PowerInfer sparse GGUF or plain llama.cpp GGUF."""
from .convert import OUTTYPES, convert
