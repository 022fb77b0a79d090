"""ligerfx: turn pretrained Hugging Face causal LMs into Liger gated linear-recurrent models with a torch.fx pass."""
from .config import LigerConfig
from . import ops

__version__ = "0.1.0"
