"""FedAvg vs FedBABU on a folder of images (``root/<class name>/*.png``), with ``fedbabu.compare``.

To stay self-contained the example first writes sklearn's digits as PNG files; point
``--images`` at your own folder instead (all images the same size, or pass ``size=`` to
``read_image_folder``).

    python examples/compare_image_folder.py [--images DIR] [--rounds 20] [--out runs/examples/compare]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

import fedbabu


def write_digit_pngs(root: Path) -> None:
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / f"digit-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8), mode="L").save(folder / f"{index:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="root/<class name>/*.png (default: digits written as PNGs)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--out", default="runs/examples/compare")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.images
        if root is None:
            root = Path(scratch) / "digits"
            write_digit_pngs(root)
        folder = fedbabu.read_image_folder(root)
    print(f"{len(folder.labels)} images of {len(folder.class_names)} classes: {', '.join(folder.class_names)}")
    data = fedbabu.from_arrays(folder.images, folder.labels, class_names=folder.class_names)

    config = fedbabu.load_config(extra={"rounds": args.rounds, "eval_every": 5, "model": "digitcnn"})
    seeds = [int(s) for s in args.seeds.split(",")]
    comparison = fedbabu.compare(config, ["fedavg", "fedbabu"], seeds=seeds, data=data, out=args.out,
                                 overwrite=True)
    for row in comparison.rows:
        print(f"{row['algorithm']}: initial {100 * row['initial_mean']:.2f}%, "
              f"personalized {100 * row['personalized_mean']:.2f}%")
    print(f"comparison: {comparison.folder / 'comparison.md'}")


if __name__ == "__main__":
    main()
