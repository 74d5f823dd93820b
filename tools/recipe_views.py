"""The budget facts of a pretraining command line: views per image (a multi-crop's small crops count
as one more view, as the PIC README counts their cost) and whether the sliding-window sampler is on.

    python tools/recipe_views.py --config scripts/configs/fmnist/BYOL.yaml     # prints "2 0"
    python tools/recipe_views.py --model PIC --aug MultiCrop                     # prints "2 0"

``scripts/bench_fashion_mnist.sh`` uses it to turn a budget of views into epochs for any method.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contrast.models import METHODS  # noqa: E402
from contrast.option import parse_pretrain_args  # noqa: E402


def main(argv=None) -> str:
    args = parse_pretrain_args(argv)
    views = METHODS[args.model].views
    small = views.total(args.aug, args.num_crop2) > views.count
    return f"{views.count + int(small)} {int(bool(args.use_sliding_window_sampler))}"


if __name__ == "__main__":
    print(main())
