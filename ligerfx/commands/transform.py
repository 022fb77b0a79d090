"""``ligerfx transform MODEL OUT``: linearize a model and save it (unchanged weights + ``config.ligerfx``)."""
from __future__ import annotations

import time

from ..config import VARIANTS


def add_arguments(p):
    p.add_argument("model", help="local HF model directory, .gguf file, or 'gemma-3-270m'")
    p.add_argument("out", help="output directory (loadable with ligerfx.from_pretrained)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--mix", type=float, default=0.5)
    p.add_argument("--variant", choices=VARIANTS, default="gla")
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated layer indices to linearize (default: all)")
    p.add_argument("--only-full-attention", action="store_true")
    p.add_argument("--dtype", default="float32")


def run(args) -> int:
    import ligerfx
    from ligerfx.models import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device="cpu")
    cfg = ligerfx.LigerConfig(window=args.window, mix=args.mix, variant=args.variant, layers=args.layers,
                              only_full_attention=args.only_full_attention)
    t0 = time.time()
    ligerfx.transform(model, passes=["linearize"], config=cfg)
    print(f"linearized {len(ligerfx.sites(model))} attention layers in {time.time() - t0:.1f}s")
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"saved to {args.out} (load with ligerfx.from_pretrained({args.out!r}))")
    return 0
