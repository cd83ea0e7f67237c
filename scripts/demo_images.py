"""Write a few test images of a data source as PNG files, for `make demo` to classify with cifar-infer.

python scripts/demo_images.py --data $CIFARKIT_DATA --out runs/demo/samples --count 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from cifarkit.data import load_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=20)
    args = p.parse_args()
    data = load_data(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step = max(1, len(data.test_y) // args.count)  # spread over the (class-sorted) test set
    for n, i in enumerate(range(0, step * args.count, step)):
        Image.fromarray(data.test_x[i]).save(out / f"{n:02d}-{data.classes[data.test_y[i]]}.png")
    print(f"wrote {args.count} test images to {out} (true class in the file name)")


if __name__ == "__main__":
    main()
