"""``ligerfx train`` with the Triton kernels behind the ``ligerfx::`` ops on CUDA (the reference ops otherwise).

    python examples/train_gpu.py --model gemma-3-270m -o runs/gemma-liger --micro-batch-size 8 --max-tokens 20M

Takes every option of ``ligerfx train`` (see ``ligerfx train --help``). ``LIGERFX_KERNELS=reference`` keeps the
plain-PyTorch reference kernels even on CUDA. Since ligerfx registers the Triton kernels for CUDA on import (commit
541adab), plain ``ligerfx train`` does the same as this script; the script stays as the exact command of the run. The adapter in ``examples/adapters/gemma-3-270m-liger-gla`` was
trained with this script on one GPU (see its README.md for the exact command).
"""
import os
import sys

import torch

from ligerfx.training import cli


def main(argv=None) -> int:
    if torch.cuda.is_available():
        from ligerfx import ops

        if os.environ.get("LIGERFX_KERNELS", "triton") == "reference":
            for impls in ops._IMPLS.values():
                impls.pop("cuda", None)
            print("ligerfx: reference kernels on CUDA", file=sys.stderr, flush=True)
        else:
            from ligerfx.kernels import triton_impls

            triton_impls.register()  # ligerfx now does this on import too; kept for older checkouts
            print("ligerfx: Triton kernels registered for CUDA tensors", file=sys.stderr, flush=True)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
