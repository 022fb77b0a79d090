"""ligerfx: turn pretrained Hugging Face causal LMs into Liger gated linear-recurrent models with a torch.fx pass.

    import ligerfx
    model = ligerfx.transform(model, passes=["linearize"], config=ligerfx.LigerConfig(window=64))
"""
from .config import LigerConfig
from . import ops
from .passes.patterns import UnsupportedAttentionError
from .passes.linearize import counters
from .api import AttentionSite, cache_nbytes, from_pretrained, sites, teacher_mode, transform
from .adapters import load_adapter, merge_lora, save_adapter
from . import backend  # registers torch.compile(backend="ligerfx")

__version__ = "0.1.0"
__all__ = ["LigerConfig", "UnsupportedAttentionError", "AttentionSite", "transform", "from_pretrained", "sites",
           "teacher_mode", "counters", "cache_nbytes", "save_adapter", "load_adapter", "merge_lora"]
