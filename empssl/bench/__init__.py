"""Benchmarks of the kernels and the training step, installed with the package.

    empssl bench tcr | augment | step | epoch | predict | data [--quick | --tiny] [--out DIR | --csv FILE] [--no-plot]
    python -m empssl.bench tcr ...        (the same)

Each writes one CSV (columns ``empssl.bench.common.FIELDS``, a row appended as soon as it is
measured) with the device name and versions, a PNG where matplotlib is installed, and a table on
stdout. ``--quick`` sizes a run for a CPU; ``--tiny`` checks the script in seconds.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

BENCHMARKS = {
    "tcr": "Total Coding Rate forward+backward: fused backends vs the published formula and peers",
    "augment": "multi-patch augmentation throughput: fused backends vs PIL, torchvision, kornia, albumentations",
    "step": "one training step split into augmentation, forward, loss, backward+optimiser",
    "epoch": "free-running training steps of each step variant and the extrapolated CIFAR-10 epoch",
    "predict": "the epoch each step variant should take on a GPU, from kernels, FLOPs and bytes counted on the CPU",
    "data": "image data: building the on-disk store on every core, reading a step's images from it, against the need",
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = __doc__.strip() + "\n\nbenchmarks:\n" + "\n".join(f"  {k:8s} {v}" for k, v in BENCHMARKS.items())
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        print(usage, file=sys.stderr)
        print(
            f"empssl bench: error: {'name a benchmark' if not argv else f'unknown benchmark {argv[0]!r}'}"
            f" (choose from {', '.join(BENCHMARKS)})",
            file=sys.stderr,
        )
        return 2
    return importlib.import_module(f"empssl.bench.{argv[0]}").main(argv[1:])
