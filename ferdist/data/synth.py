"""A SYNTHETIC FER-like dataset: drawn 48x48 faces whose mouth, brows and eyes differ by class.

It exists so the whole pipeline (shard → train → track → evaluate) runs with no download, in tests and in the quick
start. It is not FER2013: accuracy on it says the code works, nothing about facial-expression recognition. Output is
the Kaggle CSV layout (``emotion,pixels,Usage``), so it goes through exactly the same reader as the real file.

Each class has a distinct cue a small ViT can learn in a few CPU epochs, while jitter in position, scale, contrast,
brow/mouth shape and pixel noise keeps it from being trivial::

    Angry     brows slanted down toward the nose, short tight mouth
    Disgust   one-sided raised lip (asymmetric mouth), squinted eyes
    Fear      raised slanted brows, wide eyes, wide flat open mouth
    Happy     mouth curved up (smile)
    Sad       brows slanted up, mouth curved down
    Surprise  raised brows, wide eyes, open round mouth
    Neutral   level brows, straight mouth

Run ``python -m ferdist.data.synth out.csv --rows 3000`` to write one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ferdist.constants import FACE_SIDE, FER_CLASSES, NUM_CLASSES

# Drawn at 4x and downsampled, so strokes are anti-aliased like real photos rather than hard 1-pixel lines.
_SCALE = 4
_USAGE_FRACTIONS = (("Training", 0.8), ("PublicTest", 0.1), ("PrivateTest", 0.1))


def draw_face(label: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic face of class ``label`` as ``uint8[48, 48]``."""
    size = FACE_SIDE * _SCALE
    bg = int(rng.integers(20, 90))
    skin = int(rng.integers(130, 220))
    ink = int(rng.integers(10, 60))
    img = Image.new("L", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = _SCALE
    cx, cy = 24 + rng.uniform(-2.5, 2.5), 25 + rng.uniform(-2.5, 2.5)
    rx, ry = rng.uniform(15, 19), rng.uniform(18, 22)
    d.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=skin)
    w = max(1, int(round(rng.uniform(1.2, 1.8) * s)))

    # Eyes: wide for Surprise/Fear, squinted for Disgust/Angry.
    eye_dx, eye_y = rx * 0.42, cy - ry * 0.18
    eye_h = {5: 2.6, 2: 2.4, 1: 0.8, 0: 1.1}.get(label, 1.6) * rng.uniform(0.85, 1.15)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse([(ex - 2.4) * s, (eye_y - eye_h) * s, (ex + 2.4) * s, (eye_y + eye_h) * s], fill=ink)

    # Brows: (inner end height offset, overall lift); positive offset = inner end lower (angry).
    brow_y = eye_y - 4.5 - {5: 2.5, 2: 2.0}.get(label, 0.0) - rng.uniform(-0.6, 0.6)
    slant = {0: 2.6, 4: -2.2, 2: -1.8}.get(label, 0.0) * rng.uniform(0.7, 1.3)
    for side in (-1, 1):
        inner_x, outer_x = cx + side * eye_dx * 0.35, cx + side * eye_dx * 1.45
        d.line([(inner_x * s, (brow_y + slant) * s), (outer_x * s, (brow_y - slant * 0.3) * s)], fill=ink, width=w)

    # Mouth.
    my = cy + ry * 0.5 + rng.uniform(-1.0, 1.0)
    mw = rx * rng.uniform(0.38, 0.5)
    curve = rng.uniform(2.5, 4.0)
    box = [(cx - mw) * s, (my - curve) * s, (cx + mw) * s, (my + curve) * s]
    if label == 3:  # Happy: smile
        d.arc(box, start=15, end=165, fill=ink, width=w)
    elif label == 4:  # Sad: frown
        d.arc([(cx - mw) * s, my * s, (cx + mw) * s, (my + 2 * curve) * s], start=195, end=345, fill=ink, width=w)
    elif label == 5:  # Surprise: open round mouth
        r = rng.uniform(2.8, 3.8)
        d.ellipse([(cx - r) * s, (my - r) * s, (cx + r) * s, (my + r) * s], fill=ink)
    elif label == 2:  # Fear: wide, flat, open
        d.ellipse([(cx - mw) * s, (my - 1.6) * s, (cx + mw) * s, (my + 1.6) * s], fill=ink)
    elif label == 1:  # Disgust: one corner raised
        side = rng.choice((-1, 1))
        d.line([((cx - side * mw) * s, (my + 1) * s), ((cx + side * mw) * s, (my - 3) * s)], fill=ink, width=w)
    elif label == 0:  # Angry: short tight line
        d.line([((cx - mw * 0.7) * s, my * s), ((cx + mw * 0.7) * s, my * s)], fill=ink, width=w + s // 2)
    else:  # Neutral
        d.line([((cx - mw) * s, my * s), ((cx + mw) * s, my * s)], fill=ink, width=w)

    small = np.asarray(img.resize((FACE_SIDE, FACE_SIDE), Image.Resampling.BOX), dtype=np.float32)
    small += rng.normal(0.0, rng.uniform(3.0, 9.0), small.shape)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def make_synthetic_csv(rows: int = 3000, *, seed: int = 0) -> bytes:
    """A SYNTHETIC dataset in the Kaggle CSV layout: balanced classes, 80/10/10 Training/PublicTest/PrivateTest."""
    if rows < 3 * NUM_CLASSES:
        raise ValueError(f"rows must be at least {3 * NUM_CLASSES} so every split holds every class")
    rng = np.random.default_rng(seed)
    out = ["emotion,pixels,Usage"]
    start = 0
    for i, (usage, fraction) in enumerate(_USAGE_FRACTIONS):
        count = rows - start if i == len(_USAGE_FRACTIONS) - 1 else int(round(rows * fraction))
        labels = np.arange(count) % NUM_CLASSES
        rng.shuffle(labels)
        for label in labels:
            pixels = " ".join(map(str, draw_face(int(label), rng).ravel().tolist()))
            out.append(f"{int(label)},{pixels},{usage}")
        start += count
    return ("\n".join(out) + "\n").encode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a SYNTHETIC FER-like CSV (Kaggle layout) for tests and demos.")
    parser.add_argument("out", type=Path, help="CSV file to write")
    parser.add_argument("--rows", type=int, default=3000, help="number of faces (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.write_bytes(make_synthetic_csv(args.rows, seed=args.seed))
    print(f"wrote {args.rows} SYNTHETIC faces ({', '.join(FER_CLASSES)}) to {args.out}")


if __name__ == "__main__":
    main()
