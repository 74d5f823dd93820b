"""docs/deviations.md states the blur kernel sizes the code uses."""
import os
import re

from contrast.data.transforms import blur_kernel_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(number: int) -> str:
    with open(os.path.join(ROOT, "docs", "deviations.md"), encoding="utf-8") as f:
        rows = [line for line in f if line.startswith(f"| {number} |")]
    assert len(rows) == 1, f"row {number} of docs/deviations.md"
    return rows[0]


def test_deviation_row_32_gives_the_kernel_sizes_the_code_uses():
    row = _row(32)
    assert "Gaussian blur" in row
    pairs = [(int(k), int(side)) for k, side in re.findall(r"(\d+)(?: px)? at (\d+)", row)]
    assert {side for _, side in pairs} == {224, 160, 96}
    for k, side in pairs:
        assert k == blur_kernel_size(side), f"row 32 says {k} at {side}, the code uses {blur_kernel_size(side)}"
    # SimCLR's rule written out: ~10 % of the side, odd
    assert [(side // 10) // 2 * 2 + 1 for side in (224, 160, 96)] == [23, 17, 9]
