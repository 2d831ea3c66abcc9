"""Write MNIST digits in the form of scikit-learn's 8x8 digits, as a folder fewgen's
``import-synthetic`` step reads: ``OUT/<digit>/<index>.png`` at the digits preset's 16x16.

The README uses it as an oracle for issue 5's question "would better synthetic images help?":
real, correctly labelled images of the novel classes from another source, standing where a
perfect generator's output would. It follows the optdigits preprocessing (a 32x32 bitmap of the
character, 4x4 blocks counted into 0..16); the bitmap's width factor and threshold were chosen
on the base classes 0-2 only (mean-image distance to scikit-learn's digits), never on novel ones.

    python scripts/mnist_as_digits.py /tmp/mnist-as-digits --per-class 200 --digits 5 6 7 8 9
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def optdigits_8x8(img: np.ndarray, width_factor: float = 0.8, min_width: int = 16, threshold: int = 64) -> np.ndarray:
    """(28, 28) uint8 MNIST digit -> (8, 8) counts 0..16, like the UCI optdigits bitmaps."""
    ys, xs = np.nonzero(img > threshold)
    crop = (img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] > threshold).astype(np.float32)
    h, w = crop.shape
    width = int(round(min(32, max(min_width, width_factor * w * 32 / h))))
    scaled = F.interpolate(torch.from_numpy(crop)[None, None], size=(32, width), mode="nearest")[0, 0]
    bitmap = torch.zeros(32, 32)
    left = (32 - width) // 2
    bitmap[:, left : left + width] = scaled
    return bitmap.view(8, 4, 8, 4).sum((1, 3)).numpy()


def main() -> None:
    from PIL import Image

    from fewgen.data.datasets import _read_idx, _resize_float, data_root

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (must not exist)")
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--digits", type=int, nargs="+", default=[5, 6, 7, 8, 9], help="classes to write (digits' novel 5-9)")
    p.add_argument("--size", type=int, default=16, help="image size (the digits preset's 16)")
    p.add_argument("--data-root", default=None, help="data root with mnist/ (default $FEWGEN_DATA)")
    a = p.parse_args()
    if a.out.exists():
        raise SystemExit(f"error: {a.out} exists; give a new folder")
    mnist = data_root(a.data_root) / "mnist"
    x = _read_idx(mnist / "t10k-images-idx3-ubyte.gz")
    y = _read_idx(mnist / "t10k-labels-idx1-ubyte.gz")
    tmp = a.out.with_name(a.out.name + ".partial")
    for digit in a.digits:
        idx = np.nonzero(y == digit)[0][: a.per_class]
        small = torch.from_numpy(np.stack([optdigits_8x8(x[i]) for i in idx]) / 16.0).float().unsqueeze(1)
        images = _resize_float(small, a.size)  # the digits loader's own resize
        (tmp / str(digit)).mkdir(parents=True, exist_ok=True)
        for j, im in enumerate(images):
            Image.fromarray(im[0].numpy()).save(tmp / str(digit) / f"{j:04d}.png")
    tmp.rename(a.out)
    print(f"wrote {len(a.digits)} x {a.per_class} images to {a.out}")


if __name__ == "__main__":
    main()
