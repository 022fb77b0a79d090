"""Linearize + LoRA fine-tuning loop (Liger's recipe, liger-method.md §4), single process or DDP under ``torchrun``.

One optimizer step consumes ``batch_size`` packed chunks (global chunk indices ``[s*G, (s+1)*G)``); rank ``r`` takes
``micro_batch_size * grad_accum`` consecutive ones of them. The loss is the token-weighted mean over every response
token of the global batch: each micro-batch backpropagates ``sum(CE) / n_targets(global batch) * world_size``, so
gradient accumulation and DDP averaging give exactly the full-batch mean. With ``--distill`` the same weights, run
under ``ligerfx.teacher_mode`` with LoRA bypassed, give teacher logits and the loss adds ``w * KL(teacher || student)``
over the same tokens.

A checkpoint (``checkpoint-NNNNNNN/``) holds the adapter (peft format), optimizer, scheduler, step / data position and
every rank's RNG states; it is written to a temporary folder and renamed, so a crash never leaves a half checkpoint.
A resumed run rebuilds the model exactly as a fresh one, loads the checkpoint and continues; on CPU its loss curve is
bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..adapters import lora_disabled, lora_layers, save_adapter, load_adapter, unwrap
from ..config import LigerConfig
from .data import (IGNORE_INDEX, ChunkStream, DataError, Source, pack_in_order, parse_count, read_records,
                   tokenize_records)

CHECKPOINT_PREFIX = "checkpoint-"
LOG_FIELDS = ["step", "tokens", "epoch", "loss", "ce", "kl", "at", "lr", "grad_norm", "tokens_per_s", "elapsed_s",
              "val_loss"]
# args that must not change when a run is resumed (the loss curve would no longer continue the same run)
RESUME_INVARIANTS = [
    "model", "data", "mix_data", "max_samples", "val_samples", "seq_len", "packing", "batch_size", "lr", "min_lr_ratio",
    "warmup_steps", "weight_decay", "beta1", "beta2", "max_grad_norm", "max_tokens", "epochs", "seed", "distill",
    "distill_weight", "distill_temperature", "ce_weight", "attn_transfer", "lora_r", "lora_alpha", "lora_dropout",
    "lora_targets", "window", "liger_mix", "gate_normalizer", "variant", "sinks", "sink_position", "layers",
    "only_full_attention",
    "dtype", "precision",
]


# ----------------------------------------------------------------------------------------------------------------
# process group, devices, precision

@dataclasses.dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


def setup_distributed(device_arg: str = "auto") -> DistInfo:
    """Read torchrun's env (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), pick the device, init the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but CUDA is not available")
        device = torch.device("cuda", local_rank if ":" not in device_arg else int(device_arg.split(":")[1]))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def _all_reduce(values: list[float], info: DistInfo) -> list[float]:
    if not info.ddp:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(info: DistInfo) -> None:
    if info.ddp:
        dist.barrier()


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


# ----------------------------------------------------------------------------------------------------------------
# model

def _ligerfx_fn(name: str):
    """``ligerfx.<name>``, or ``ligerfx.api.<name>`` while the package does not re-export it."""
    import ligerfx

    fn = getattr(ligerfx, name, None)
    if fn is None:
        fn = getattr(importlib.import_module("ligerfx.api"), name)
    return fn


def liger_config_from_args(args) -> LigerConfig:
    lora = {"targets": list(args.lora_targets), "r": args.lora_r, "alpha": args.lora_alpha,
            "dropout": args.lora_dropout}
    return LigerConfig(window=args.window, mix=args.liger_mix, gate_normalizer=args.gate_normalizer,
                       variant=args.variant, sinks=args.sinks, layers=args.layers,
                       sink_position=getattr(args, "sink_position", None),
                       only_full_attention=args.only_full_attention, lora=lora)


def load_model_and_tokenizer(spec: str, dtype: str, device: torch.device):
    """``ligerfx.models.load_model`` (local dirs, ``.gguf``, packaged names); plain HF loading if it is missing."""
    try:
        from ligerfx.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model(spec, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(spec).is_dir():
        raise FileNotFoundError(f"{spec}: not a local model directory (ligerfx.models is not available)")
    tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=getattr(torch, dtype), local_files_only=True)
    return model.to(device).eval(), tokenizer


def build_model(args, info: DistInfo):
    """Load, linearize and LoRA-wrap the model exactly the same way in a fresh and a resumed run."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, info.device)
    cfg = liger_config_from_args(args)
    model = _ligerfx_fn("transform")(model, passes=["linearize", "lora"], config=cfg)
    n_lora = len(lora_layers(model))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in fp32 whatever the base dtype
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model, tokenizer, cfg, n_lora


# ----------------------------------------------------------------------------------------------------------------
# data

def read_data(args) -> list[tuple[str, Optional[float], str, list]]:
    """Read and validate every line of every data file (before the model is even loaded)."""
    specs = [(args.data, None)] + [_split_mix(m) for m in args.mix_data]
    read = []
    for path, weight in specs:
        schema, records = read_records(path, limit=args.max_samples)
        read.append((path, weight, schema, records))
    path0, records0 = read[0][0], read[0][3]
    if args.val_samples >= len(records0):
        raise DataError(f"{path0}: --val-samples {args.val_samples} leaves no training records ({len(records0)} read)")
    mix_total = sum(w for _, w, _, _ in read[1:])
    if mix_total >= 1.0:
        raise ValueError(f"--mix-data fractions sum to {mix_total}; they must leave a share (< 1) for --data")
    return read


def build_sources(args, read, tokenizer, log) -> tuple[list[Source], list[float], list]:
    """Tokenize and pack: one :class:`Source` per file with its chunk share, and the validation pieces."""
    path0, records0 = read[0][0], read[0][3]
    val_records, train_records = records0[:args.val_samples], records0[args.val_samples:]
    mix_total = sum(w for _, w, _, _ in read[1:])
    sources, weights = [], []
    for i, (path, weight, schema, records) in enumerate(read):
        recs = train_records if i == 0 else records
        t0 = time.time()
        samples = tokenize_records(recs, tokenizer)
        src = Source(str(path), samples, args.seq_len, seed=args.seed * 1000 + i,
                     packing=getattr(args, "packing", "concat"))
        sources.append(src)
        weights.append(1.0 - mix_total if i == 0 else weight)
        log(f"data {path}: {schema}, {len(recs)} records, {src.tokens_per_epoch:,} tokens/epoch "
            f"= {src.chunks_per_epoch:,} chunks of {args.seq_len} (tokenized in {time.time() - t0:.1f}s)")
    val = pack_in_order(tokenize_records(val_records, tokenizer), args.seq_len) if val_records else []
    if val_records:
        log(f"validation: first {len(val_records)} records of {path0} -> {len(val)} chunks")
    return sources, weights, val


def schedule_steps(args, sources: list[Source], weights: list[float]) -> int:
    """Optimizer steps of the run: ``--epochs`` of the first corpus if given, else ``--max-tokens``."""
    G = args.batch_size
    if args.epochs is not None:
        chunks = args.epochs * sources[0].chunks_per_epoch / (weights[0] / sum(weights))
        steps = int(chunks // G)
        what = f"--epochs {args.epochs} ({sources[0].chunks_per_epoch} chunks per epoch)"
    else:
        steps = parse_count(args.max_tokens) // (args.seq_len * G)
        what = f"--max-tokens {args.max_tokens}"
    if steps < 1:
        raise ValueError(f"{what} is less than one batch ({G} x {args.seq_len} tokens)")
    return steps


def _split_mix(spec: str) -> tuple[str, float]:
    path, sep, frac = spec.rpartition(":")
    if not sep or not path:
        raise ValueError(f"--mix-data {spec!r}: expected PATH:FRACTION, e.g. t0.jsonl.xz:0.2")
    try:
        value = float(frac)
    except ValueError:
        raise ValueError(f"--mix-data {spec!r}: fraction {frac!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"--mix-data {spec!r}: fraction must lie in (0, 1)")
    return path, value


def _batch(stream: ChunkStream, indices, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input_ids, labels, number of loss targets)`` of the chunks at global ``indices``."""
    pairs = [stream.get(i) for i in indices]
    ids = np.stack([p[0] for p in pairs]).astype(np.int64)
    labels = np.stack([p[1] for p in pairs]).astype(np.int64)
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device), n_targets


def _n_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------------------------
# loss

def _target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a target (union over the batch); logits there are all the loss needs."""
    valid = labels[:, 1:] != IGNORE_INDEX
    pos = valid.any(0).nonzero().squeeze(1)
    if pos.numel() == 0:  # keep the graph (DDP needs every rank to backprop) with an all-ignored position
        pos = torch.zeros(1, dtype=torch.long, device=labels.device)
    return pos


def _logits(model, input_ids: torch.Tensor, pos: torch.Tensor, keep_arg: bool) -> torch.Tensor:
    if keep_arg:
        return model(input_ids=input_ids, use_cache=False, logits_to_keep=pos).logits
    return model(input_ids=input_ids, use_cache=False).logits[:, pos]


def micro_step_loss(model, bare, input_ids, labels, *, keep_arg: bool, distill: bool, temperature: float,
                    device: torch.device, precision: str, teacher=None,
                    attn_transfer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE, summed KL and summed attention-transfer error over the target tokens of one micro-batch (KL is 0
    without ``distill``, the transfer term 0 without ``attn_transfer``).

    ``model`` runs the student forward (``bare``, its DDP wrapper or a compiled one); ``teacher`` (default ``bare``)
    the teacher forward, called with ``bare`` in teacher mode and its LoRA layers off. With ``attn_transfer`` both
    forwards also record the output of every linearized attention module (see :func:`attention_transfer`)."""
    if attn_transfer and not distill:
        raise ValueError("attn_transfer compares with the teacher forward that distill runs: pass distill=True")
    pos = _target_positions(labels)
    targets = labels[:, 1:][:, pos]
    t_outs, s_outs = [], []
    if distill:
        teacher_mode = _ligerfx_fn("teacher_mode")
        with torch.no_grad(), teacher_mode(bare), lora_disabled(bare), autocast_context(device, precision), \
                attention_outputs(bare, t_outs if attn_transfer else None):
            t_logits = _logits(bare if teacher is None else teacher, input_ids, pos, keep_arg)
    with autocast_context(device, precision), attention_outputs(bare, s_outs if attn_transfer else None):
        logits = _logits(model, input_ids, pos, keep_arg)
    logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    zero = torch.zeros((), device=ce.device)
    if not distill:
        return ce, zero, zero
    mask = targets != IGNORE_INDEX
    at = attention_transfer(t_outs, s_outs, pos, mask) if attn_transfer else zero
    return ce, distill_kl(t_logits[mask], logits[mask], temperature), at


@contextlib.contextmanager
def attention_outputs(bare, sink: Optional[list]):
    """Append the output of every linearized attention module of ``bare`` to ``sink`` while inside (nothing if
    ``sink`` is None). The hooks sit on the modules, so they see the teacher-mode forward too."""
    if sink is None:
        yield
        return

    def hook(module, args, out):
        sink.append(out[0] if isinstance(out, (tuple, list)) else out)

    handles = [m.register_forward_hook(hook) for m in bare.modules() if hasattr(m, "_ligerfx")]
    if not handles:
        raise ValueError("--attn-transfer: the model has no linearized attention module")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attention_transfer(t_outs: list, s_outs: list, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention transfer: sum over target tokens of the mean over linearized layers of
    ``||student_out - teacher_out||^2 / mean_tokens(||teacher_out||^2)``, in fp32.

    ``*_outs[l]`` is layer l's attention-module output ``[B, T, hidden]`` (teacher: original softmax attention, LoRA
    off; student: Liger attention); ``pos``/``mask`` pick the target tokens as for the CE. The error is relative to the
    teacher's own scale, so layers with large activations do not dominate. It compares whole-model forwards: each
    student layer sees the student's hidden states, so errors of earlier layers count in later ones."""
    if len(t_outs) != len(s_outs) or not s_outs:
        raise RuntimeError(f"attention transfer: {len(t_outs)} teacher and {len(s_outs)} student layer outputs")
    total = None
    for t, s in zip(t_outs, s_outs):
        t, s = t[:, pos].float(), s[:, pos].float()
        m = mask.to(t.dtype)  # a micro-batch without targets gives 0, not 0/0
        ref = ((t.pow(2).sum(-1) * m).sum() / m.sum().clamp_min(1.0)).clamp_min(1e-12)
        err = ((s - t).pow(2).sum(-1) * m).sum() / ref
        total = err if total is None else total + err
    return total / len(s_outs)


def combine_losses(ce, kl, at, ce_w: float, kl_w: float, at_w: float):
    """The optimized loss: ``ce_w * CE + kl_w * KL + at_w * AT`` (a zero weight drops its term)."""
    total = ce_w * ce
    if kl_w:
        total = total + kl_w * kl
    if at_w:
        total = total + at_w * at
    return total


KL_ROWS = 1024  # rows of [rows, vocab] fp32 temporaries alive at once in ``distill_kl``


def _kl_rows(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t_logp = F.log_softmax(t_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def distill_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed KL(teacher || student) over rows of ``[N, vocab]`` logits, times ``temperature**2``.

    Computed ``KL_ROWS`` rows at a time, each block under activation checkpointing: with a 262k vocabulary the
    fp32 log-softmaxes of 8K rows would otherwise keep ~50 GB of temporaries alive for the backward."""
    if t_logits.shape[0] <= KL_ROWS or not torch.is_grad_enabled():
        return _kl_rows(t_logits, s_logits, temperature) * temperature**2
    from torch.utils.checkpoint import checkpoint

    total = s_logits.new_zeros((), dtype=torch.float32)
    for i in range(0, t_logits.shape[0], KL_ROWS):
        total = total + checkpoint(_kl_rows, t_logits[i:i + KL_ROWS], s_logits[i:i + KL_ROWS], temperature,
                                   use_reentrant=False)
    return total * temperature**2


@torch.no_grad()
def evaluate(model, pieces: list, info: DistInfo, precision: str, keep_arg: bool) -> Optional[float]:
    """Token-weighted mean CE over validation ``pieces`` (split across ranks)."""
    if not pieces:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, labels in pieces[info.rank::info.world]:
        ids_t = torch.from_numpy(ids.astype(np.int64))[None].to(info.device)
        lab_t = torch.from_numpy(labels.astype(np.int64))[None].to(info.device)
        pos = _target_positions(lab_t)
        with autocast_context(info.device, precision):
            logits = _logits(model, ids_t, pos, keep_arg)
        total += F.cross_entropy(logits.float().flatten(0, 1), lab_t[:, 1:][:, pos].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += _n_targets(lab_t)
    total, count = _all_reduce([total, float(count)], info)
    model.train(was_training)
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# optimizer, schedule

def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup over ``warmup_steps`` (the last warmup step reaches the peak), then cosine to ``min_ratio``."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


def make_optimizer(params, args, device: torch.device):
    kwargs = dict(lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    out = []
    for p in run_dir.glob(CHECKPOINT_PREFIX + "*"):
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.pt").is_file():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, info: DistInfo, keep: int,
                    liger_config: Optional[dict] = None) -> Path:
    """Write ``checkpoint-<step>/`` atomically: every rank adds its RNG state to a temporary folder, rank 0 renames.
    ``liger_config`` goes beside the adapter as ``ligerfx_config.json`` (what ``ligerfx eval --adapter`` reads)."""
    final = run_dir / f"{CHECKPOINT_PREFIX}{state['step']:07d}"
    tmp = run_dir / f".{final.name}.tmp"
    if info.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(info)
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.main:
        save_adapter(model, tmp)
        if liger_config is not None:
            (tmp / "ligerfx_config.json").write_text(json.dumps(liger_config, indent=2) + "\n")
        torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "trainer_state.pt")
    _barrier(info)
    if info.main:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(info)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, info: DistInfo) -> dict:
    """Load adapter, optimizer and scheduler; return the saved state (RNG states are restored separately)."""
    load_adapter(unwrap(model), ckpt, trainable=True)
    state = torch.load(ckpt / "trainer_state.pt", map_location=info.device, weights_only=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def restore_rng(ckpt: Path, info: DistInfo, seed: int, log) -> None:
    path = ckpt / f"rng_rank{info.rank}.pt"
    if path.is_file():
        _set_rng_state(torch.load(path, weights_only=False))
    else:
        log(f"warning: {path} missing (world size changed?); reseeding rank {info.rank}")
        _reseed(seed + 7919 * (1 + info.rank))


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# run folder: args, CSV log, loss curve

def _args_record(args) -> dict:
    d = {k: v for k, v in vars(args).items() if k not in ("func", "_handler")}
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    return d


def check_resume_args(saved: dict, current: dict) -> None:
    diffs = [f"{k}: run has {saved.get(k)!r}, now {current.get(k)!r}"
             for k in RESUME_INVARIANTS if k in saved and saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError("--resume with arguments that change the run:\n  " + "\n  ".join(diffs))


class RunLog:
    """``log.csv`` (one row per optimizer step) and ``loss.png`` in the run folder (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: Optional[int]):
        self.path, self.png, self.enabled = run_dir / "log.csv", run_dir / "loss.png", enabled
        self._warned = False
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = self.path.with_name(".log.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=LOG_FIELDS)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._writer.writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()

    def plot(self) -> Optional[Path]:
        """Loss curve PNG from ``log.csv``; skipped with one warning if matplotlib is not installed."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if not self._warned:
                warnings.warn("matplotlib is not installed: no loss.png (pip install matplotlib)", stacklevel=2)
                self._warned = True
            return None
        rows = read_log(self.path)
        if not rows:
            return None
        steps = [r["step"] for r in rows]
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        ax.plot(steps, [r["loss"] for r in rows], lw=0.8, alpha=0.5, label="train loss")
        if len(rows) >= 10:
            k = max(2, len(rows) // 50)
            smooth = np.convolve([r["loss"] for r in rows], np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=1.6, label=f"train loss ({k}-step mean)")
        val = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        if val:
            ax.plot(*zip(*val), "o-", ms=4, label="validation loss")
        if any(r.get("kl") is not None for r in rows):  # a loss of several terms: draw each one
            for key, label in (("ce", "cross-entropy"), ("kl", "KL to the teacher"), ("at", "attention transfer")):
                terms = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if terms:
                    ax.plot(*zip(*terms), lw=0.7, alpha=0.6, ls="--", label=f"{label} (unweighted)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / target token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png.with_name(".loss.png.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.png)
        return self.png


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def read_log(path) -> list[dict]:
    """``log.csv`` as dicts of numbers (``None`` for empty cells)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                row[k] = None if v == "" else (int(v) if k in ("step", "tokens") else float(v))
            out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the loop

class StopRequest:
    """SIGTERM/SIGINT and ``--time-limit`` turned into a flag the training loop checks between steps (all ranks agree
    through an all-reduce), so a stopped run always ends on a resumable checkpoint."""

    def __init__(self, time_limit: Optional[float], t0: float):
        self.time_limit, self.t0 = time_limit, t0
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def reason(self, step_seconds: Optional[float], save_seconds: float) -> Optional[str]:
        """Why to stop before the next step (None: go on). The time limit keeps room for one more step and a save."""
        if self.signum is not None:
            import signal

            return f"signal {signal.Signals(self.signum).name}"
        if self.time_limit is not None and step_seconds is not None:
            if time.time() - self.t0 + step_seconds + save_seconds > self.time_limit:
                return f"time limit {self.time_limit:g}s"
        return None


def train(args) -> dict:
    """Run (or resume) a training run described by the parsed CLI ``args``; return a summary dict."""
    t0 = time.time()
    info = setup_distributed(args.device)
    try:
        with StopRequest(getattr(args, "time_limit", None), t0) as stop:
            return _train(args, info, stop)
    finally:
        if info.ddp and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, info: DistInfo, stop: Optional[StopRequest] = None) -> dict:
    def log(msg: str) -> None:
        if info.main and not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    run_dir = Path(args.output_dir)
    precision = resolve_precision(args.precision, info.device)
    G = args.batch_size
    per_rank, rem = divmod(G, info.world)
    if rem or per_rank % args.micro_batch_size:
        raise ValueError(f"--batch-size {G} must be a multiple of world size {info.world} x --micro-batch-size "
                         f"{args.micro_batch_size}")
    accum = per_rank // args.micro_batch_size

    # run folder and resume point
    ckpt = None
    record = _args_record(args)
    args_path = run_dir / "training_args.json"
    if args.resume:
        ckpt = Path(args.resume) if args.resume != "latest" else latest_checkpoint(run_dir)
        if ckpt is not None and not (ckpt / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"{ckpt}: not a checkpoint (no trainer_state.pt)")
        if args_path.is_file():
            check_resume_args(json.loads(args_path.read_text())["args"], record)
        if ckpt is None:
            log(f"--resume: no checkpoint in {run_dir}; starting from scratch")
    elif checkpoint_dirs(run_dir) and not args.overwrite:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume to continue or --overwrite")

    log("command: " + " ".join(["ligerfx", "train"] + [_quote(a) for a in getattr(args, "argv", [])]))
    t_setup = time.time()
    read = read_data(args)  # a malformed line fails here, before the (slow) model load
    model, tokenizer, liger_cfg, n_lora = build_model(args, info)
    bare = model
    n_train = sum(p.numel() for p in bare.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in bare.parameters())
    log(f"model {args.model}: {n_lora} LoRA-wrapped projections, {n_train:,} trainable of {n_all:,} parameters "
        f"({100 * n_train / n_all:.3f}%); {len(_ligerfx_fn('sites')(bare))} Liger sites; device {info.device}, "
        f"precision {precision}, world {info.world}")

    sources, weights, val = build_sources(args, read, tokenizer, log)
    del read
    total_steps = schedule_steps(args, sources, weights)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(round(0.03 * total_steps))
    stop_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    stream = ChunkStream(sources, weights, total_steps * G, seed=args.seed)
    keep_arg = "logits_to_keep" in inspect.signature(bare.forward).parameters

    params = [p for p in bare.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, info.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, args.min_lr_ratio))
    start_step = 0
    tokens_seen = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, bare, optimizer, scheduler, info)
        if state["chunks_consumed"] != state["step"] * G or state["total_steps"] != total_steps:
            raise ValueError(f"{ckpt}: data position / schedule do not match this run's batch size and budget")
        start_step, tokens_seen = state["step"], state["tokens"]
        log(f"resumed from {ckpt} at step {start_step} ({tokens_seen:,} tokens)")

    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None or not args_path.is_file():
            meta = {
                "args": record,
                "liger_config": liger_cfg.to_dict(),
                "derived": {"total_steps": total_steps, "total_tokens": total_steps * G * args.seq_len,
                            "warmup_steps": warmup, "grad_accum": accum,
                            "world_size": info.world, "global_batch_tokens": G * args.seq_len,
                            "precision": precision, "lora_modules": n_lora, "trainable_params": n_train},
                "versions": _versions(),
            }
            _write_text_atomic(args_path, json.dumps(meta, indent=2) + "\n")
    _barrier(info)
    runlog = RunLog(run_dir, info.main, start_step if ckpt is not None else None)

    if info.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            bare, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    teacher = None
    if getattr(args, "compile", False):
        # the ligerfx backend on a transformed model: Inductor around the Liger custom ops. Teacher mode and the
        # disabled LoRA layers are guarded on, so the teacher gets its own graph instead of recompiling the student's.
        model = torch.compile(model, backend="ligerfx")
        teacher = torch.compile(bare, backend="ligerfx") if args.distill else None
    # RNG last: everything above is rebuilt identically on resume; the loop continues the saved streams
    if ckpt is not None:
        restore_rng(ckpt, info, args.seed, log)
    else:
        _reseed(args.seed + 7919 * (1 + info.rank))
    log(f"setup {time.time() - t_setup:.1f}s; {total_steps} steps x {G} x {args.seq_len} tokens "
        f"(grad accum {accum}, warmup {warmup}), stopping at step {stop_step}")

    progress = None
    if info.main and not args.quiet and not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    ce_w = getattr(args, "ce_weight", 1.0)
    kl_w = args.distill_weight if args.distill else 0.0
    at_w = (getattr(args, "attn_transfer", 0.0) or 0.0) if args.distill else 0.0
    t_start, last_val = time.time(), None
    step_tps = None
    step = start_step
    summary_loss = None
    stopped, save_s, step_s = None, 0.0, None
    while step < stop_step:
        if stop is not None:
            why = stop.reason(step_s, save_s)
            (n_stop,) = _all_reduce([1.0 if why else 0.0], info)
            if n_stop > 0:
                stopped = why or "another rank stopped"
                break
        t0 = time.time()
        base = step * G + info.rank * per_rank
        micro = [list(range(base + j * args.micro_batch_size, base + (j + 1) * args.micro_batch_size))
                 for j in range(accum)]
        batches = [_batch(stream, idx, info.device) for idx in micro]
        (n_global,) = _all_reduce([float(sum(b[2] for b in batches))], info)
        scale = info.world / max(n_global, 1.0)
        ce_acc = kl_acc = at_acc = 0.0
        for j, (ids, labels, _) in enumerate(batches):
            sync = contextlib.nullcontext() if (not info.ddp or j == accum - 1) else model.no_sync()
            with sync:
                ce, kl, at = micro_step_loss(model, bare, ids, labels, keep_arg=keep_arg, distill=args.distill,
                                             temperature=args.distill_temperature, device=info.device,
                                             precision=precision, teacher=teacher, attn_transfer=at_w > 0)
                loss = combine_losses(ce, kl, at, ce_w, kl_w, at_w) * scale
                loss.backward()
            ce_acc = ce_acc + ce.detach()
            kl_acc = kl_acc + kl.detach()
            at_acc = at_acc + at.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf")).item()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        ce_tot, kl_tot, at_tot = _all_reduce([float(ce_acc), float(kl_acc), float(at_acc)], info)
        ce_mean, kl_mean, at_mean = (x / max(n_global, 1.0) for x in (ce_tot, kl_tot, at_tot))
        loss_mean = combine_losses(ce_mean, kl_mean, at_mean, ce_w, kl_w, at_w)
        tokens_seen += G * args.seq_len
        dt = time.time() - t0
        step_s = dt if step_s is None else max(dt, 0.9 * step_s + 0.1 * dt)
        tps = G * args.seq_len / max(dt, 1e-9)
        step_tps = tps if step_tps is None else 0.9 * step_tps + 0.1 * tps

        val_loss = None
        if val and (step == stop_step and stop_step == total_steps or
                    (args.eval_every and step % args.eval_every == 0)):
            val_loss = evaluate(bare, val, info, precision, keep_arg)
            last_val = val_loss
        runlog.write({"step": step, "tokens": tokens_seen, "epoch": round(stream.epochs(step * G), 4),
                      "loss": loss_mean, "ce": ce_mean, "kl": kl_mean if args.distill else None,
                      "at": at_mean if at_w > 0 else None, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": round(tps, 1),
                      "elapsed_s": round(time.time() - t_start, 3), "val_loss": val_loss})
        summary_loss = loss_mean
        if progress is not None:
            post = {"loss": f"{loss_mean:.4f}", "tok/s": f"{step_tps:,.0f}", "lr": f"{lr:.2e}"}
            if last_val is not None:
                post["val"] = f"{last_val:.4f}"
            progress.set_postfix(post, refresh=False)
            progress.update(1)

        if not math.isfinite(loss_mean):
            raise FloatingPointError(f"step {step}: loss is {loss_mean}; stopping (last checkpoint kept)")
        if (args.save_every and step % args.save_every == 0) or step == stop_step:
            t_save = time.time()
            state = {"step": step, "tokens": tokens_seen, "chunks_consumed": step * G, "total_steps": total_steps}
            save_checkpoint(run_dir, bare, optimizer, scheduler, state, info, keep=args.keep_checkpoints,
                            liger_config=liger_cfg.to_dict())
            runlog.plot()
            save_s = max(save_s, time.time() - t_save)

    if stopped is not None and step > start_step and latest_checkpoint(run_dir) != \
            run_dir / f"{CHECKPOINT_PREFIX}{step:07d}":
        state = {"step": step, "tokens": tokens_seen, "chunks_consumed": step * G, "total_steps": total_steps}
        save_checkpoint(run_dir, bare, optimizer, scheduler, state, info, keep=args.keep_checkpoints,
                        liger_config=liger_cfg.to_dict())
    if progress is not None:
        progress.close()
    runlog.close()
    finished = step >= total_steps
    summary = {"steps": step, "total_steps": total_steps, "tokens": tokens_seen, "final_loss": summary_loss,
               "val_loss": last_val, "finished": finished, "wall_s": round(time.time() - t_start, 1)}
    if stopped is not None:
        summary["stopped"] = stopped
        if stop is not None and stop.signum is not None:
            summary["stopped_by_signal"] = int(stop.signum)
    if info.device.type == "cuda":
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(info.device) / 2**30, 2)
    if info.main:
        if finished:
            save_adapter(bare, run_dir)
            _write_text_atomic(run_dir / "ligerfx_config.json", json.dumps(liger_cfg.to_dict(), indent=2) + "\n")
        _write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        runlog.plot()
        log(f"{'finished' if finished else 'stopped'} at step {step}/{total_steps}"
            f"{f' ({stopped}; --resume continues)' if stopped else ''}: loss {summary_loss}, "
            f"val {last_val}; run folder {run_dir}")
    _barrier(info)
    return summary


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("transformers", "peft", "ligerfx"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - informational only
            pass
    return out


def _quote(a: str) -> str:
    return a if a and all(c.isalnum() or c in "-_./:=,@+" for c in a) else json.dumps(a)
