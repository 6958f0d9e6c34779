"""Small stand-ins for data sets that cannot be downloaded here, in their official layouts.

tfds has no Tiny ImageNet builder, so ``tfds.testing.mock_data`` cannot stand
in for it; :func:`write_fake_tiny_imagenet` writes a miniature
``tiny-imagenet-200`` folder that the real loader (``gce_jax.data``) reads
unchanged. Used by the tests and by ``experiments.reproduce --mock_data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# Synthetic, well-formed wnids (not the real ones): 200 distinct ids.
FAKE_WNIDS: tuple[str, ...] = tuple(f"n{1440764 + 37 * i:08d}" for i in range(200))


def write_fake_tiny_imagenet(root: str | Path, *, wnids: Sequence[str] = FAKE_WNIDS,
                             train_per_class: int = 1, n_val: int = 6,
                             seed: int = 5) -> Path:
    """Writes random 64x64 JPEGs as ``root/{wnids.txt, train/, val/, test/}``.

    Matches the official archive: ``train/<wnid>/images/<wnid>_<i>.JPEG`` with
    a ``<wnid>_boxes.txt`` beside, ``val/images/`` labelled by the tab-separated
    ``val/val_annotations.txt``, an unlabelled ``test/images/``. Every 50th
    class's training images are grayscale JPEGs, as a few official ones are.
    ``root`` must not exist yet (nothing is overwritten).
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        boxes = []
        for j in range(train_per_class):
            x = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            img = Image.fromarray(x[..., 0]) if i % 50 == 0 else Image.fromarray(x)
            img.save(d / f"{w}_{j}.JPEG", format="JPEG")
            boxes.append(f"{w}_{j}.JPEG\t0\t0\t63\t63")
        (root / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for j in range(n_val):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "val" / "images" / f"val_{j}.JPEG", format="JPEG")
        lines.append(f"val_{j}.JPEG\t{wnids[(7 * j) % len(wnids)]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    return root
