"""The embedded default dataset: procedurally drawn faces with known quality.

(Over 400 lines on purpose: the face drawing, the distortions and the label that depends
on them are one recipe, read together.)

`fiqa make-demo-data OUT` writes a small FIQA benchmark that needs no download,
no licence and no GPU, so the whole recipe can be run and tested anywhere.

Each image is drawn at 2x and downsampled to ``image_size`` (default 112 px,
the size of aligned face crops): a background (flat, gradient or blobs), neck,
ears, a face ellipse in one of many skin tones, hair in several styles, eyes
(sclera, iris colour, pupil), brows, nose, mouth, optional glasses, sunglasses
and beard, a lighting gradient, and a pose (offset, scale, roll, yaw).

It is then degraded by 0-3 distortions picked at random, each with a severity
``s`` in [0, 1], applied in the order a camera would produce them:

============  ==========================================================  ======
distortion    what ``s`` controls                                         weight
============  ==========================================================  ======
occlusion     an object (hand, mask, bar, blob) covering 5-40 % of face   0.55
exposure      gain 2**(+/-(0.5 + 2 s)) with a gamma shift                 0.60
blur          Gaussian blur, radius 0.4 + 2.6 s px                        0.85
downsample    down by 1.5 + 4.5 s, back up (random filters)               0.75
noise         Gaussian noise, sigma 3 + 37 s (luma or colour)             0.60
jpeg          JPEG re-encode at quality 70 - 65 s                         0.70
============  ==========================================================  ======

The MOS-like label (scale 1-5) is::

    pose = clip((|yaw| / 0.35 + |roll| / 20 deg) / 2, 0, 1)
    q    = (1 - 0.25 * pose) * prod_k (1 - weight_k * s_k ** 0.8)
    mos  = clip(1 + 4 q + e, 1, 5),   e ~ N(0, 0.12)   (rater noise)

Everything is a function of ``(seed, split, index)``: the same seed gives the
same bytes whichever number of processes draws them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from fiqa.data.shards import local_output_dir

SPLITS = ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2")
UNLABELED = ("unlabeled_1", "unlabeled_2")
# The regime the system is for: few labels, a pool 20 times larger.
DEFAULT_SIZES = {
    "labeled_train": 400,
    "labeled_val": 200,
    "test": 1000,
    "unlabeled_1": 4000,
    "unlabeled_2": 4000,
}

DISTORTION_WEIGHTS = {
    "occlusion": 0.55,
    "exposure": 0.60,
    "blur": 0.85,
    "downsample": 0.75,
    "noise": 0.60,
    "jpeg": 0.70,
}
DISTORTION_ORDER = tuple(DISTORTION_WEIGHTS)
POSE_WEIGHT = 0.25
RATER_NOISE = 0.12

SKIN_TONES = [
    (255, 224, 196),
    (250, 210, 170),
    (241, 194, 125),
    (224, 172, 105),
    (198, 134, 66),
    (170, 110, 70),
    (141, 85, 36),
    (110, 66, 35),
    (80, 50, 30),
]
HAIR_COLOURS = [
    (20, 15, 10),
    (45, 30, 20),
    (90, 60, 30),
    (140, 100, 50),
    (200, 160, 90),
    (230, 210, 160),
    (150, 150, 150),
    (220, 220, 220),
    (130, 40, 20),
]
IRIS_COLOURS = [(70, 40, 20), (110, 70, 30), (60, 100, 160), (70, 120, 80), (100, 100, 110)]
LIP_COLOURS = [(170, 80, 80), (150, 60, 70), (190, 110, 100), (120, 60, 50), (200, 90, 110)]


@dataclass(frozen=True)
class Sample:
    key: str
    jpeg: bytes
    mos: float
    distortions: dict[str, float]
    pose: dict[str, float]


def _jitter(rng: np.random.Generator, colour: tuple[int, ...], amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    kind = rng.integers(0, 3)
    base = tuple(int(v) for v in rng.integers(0, 256, 3))
    if kind == 0:
        return Image.new("RGB", (size, size), base)
    if kind == 1:
        other = np.array(rng.integers(0, 256, 3), dtype=np.float32)
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        if rng.random() < 0.5:
            t = t.transpose(1, 0, 2)
        arr = np.array(base, dtype=np.float32) * (1 - t) + other * t
        arr = np.broadcast_to(arr, (size, size, 3))
        return Image.fromarray(arr.astype(np.uint8))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x, y = rng.integers(-size // 4, size, 2)
        r = int(rng.integers(size // 8, size // 2))
        draw.ellipse((x, y, x + r, y + r), fill=_jitter(rng, base, 60))
    return img.filter(ImageFilter.GaussianBlur(size / 40))


def _draw_face(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, float]]:
    """Draw one face on a transparent layer; returns the layer and its pose."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    scale = float(rng.uniform(0.85, 1.1))
    yaw = float(np.clip(rng.normal(0.0, 0.15), -0.45, 0.45))
    cx = size / 2 + rng.normal(0, 0.04 * size)
    cy = size / 2 + rng.normal(0, 0.04 * size) + 0.03 * size
    fw = 0.50 * size * scale * rng.uniform(0.85, 1.05)
    fh = fw * rng.uniform(1.15, 1.4)
    skin = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 12)
    shade = tuple(int(c * 0.82) for c in skin)
    hair = _jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 10)
    style = rng.integers(0, 4)  # 0 bald, 1 short, 2 long, 3 curly
    shift = yaw * fw * 0.35  # features move towards the side the face turns to

    if style == 2:
        d.ellipse((cx - fw * 0.62, cy - fh * 0.6, cx + fw * 0.62, cy + fh * 0.75), fill=hair)
    # neck and ears
    d.rectangle((cx - fw * 0.22, cy + fh * 0.3, cx + fw * 0.22, size), fill=shade)
    for side in (-1, 1):
        ex = cx + side * fw * 0.5 - shift * 0.5
        d.ellipse((ex - fw * 0.08, cy - fh * 0.08, ex + fw * 0.08, cy + fh * 0.12), fill=shade)
    d.ellipse((cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2), fill=skin)
    if style in (1, 3):
        d.chord(
            (cx - fw * 0.54, cy - fh * 0.62, cx + fw * 0.54, cy + fh * 0.1), 180, 360, fill=hair
        )
        if style == 3:
            for _ in range(14):
                a = rng.uniform(math.pi, 2 * math.pi)
                hx, hy = cx + math.cos(a) * fw * 0.5, cy - fh * 0.2 + math.sin(a) * fh * 0.4
                r = fw * 0.09
                d.ellipse((hx - r, hy - r, hx + r, hy + r), fill=hair)
    elif style == 2:
        d.chord(
            (cx - fw * 0.52, cy - fh * 0.58, cx + fw * 0.52, cy - fh * 0.05), 180, 360, fill=hair
        )

    eye_y = cy - fh * rng.uniform(0.04, 0.12)
    spacing = fw * rng.uniform(0.19, 0.25)
    ew, eh = fw * rng.uniform(0.09, 0.13), fh * rng.uniform(0.035, 0.055)
    iris = _jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 15)
    brow_tilt = rng.uniform(-0.04, 0.06) * fh
    brow_w = max(1, int(fw * rng.uniform(0.025, 0.05)))
    for side in (-1, 1):
        ex = cx + side * spacing + shift
        ew_side = ew * (1 - 0.5 * yaw * side)  # the far eye looks narrower
        d.ellipse((ex - ew_side, eye_y - eh, ex + ew_side, eye_y + eh), fill=(245, 245, 240))
        ir = eh * 0.95
        d.ellipse((ex - ir + shift * 0.1, eye_y - ir, ex + ir + shift * 0.1, eye_y + ir), fill=iris)
        pr = ir * 0.45
        d.ellipse(
            (ex - pr + shift * 0.1, eye_y - pr, ex + pr + shift * 0.1, eye_y + pr),
            fill=(10, 10, 10),
        )
        by = eye_y - eh * 2.4
        d.line(
            (
                ex - ew_side * 1.2,
                by + brow_tilt * side * 0.3,
                ex + ew_side * 1.2,
                by - brow_tilt * side * 0.3,
            ),
            fill=tuple(int(c * 0.7) for c in hair),
            width=brow_w,
        )
    nose_x = cx + shift * 1.2
    nose_top, nose_bot = eye_y + eh, cy + fh * rng.uniform(0.1, 0.18)
    d.line(
        (nose_x, nose_top, nose_x + fw * 0.03, nose_bot), fill=shade, width=max(1, int(fw * 0.02))
    )
    d.ellipse(
        (nose_x - fw * 0.07, nose_bot - fh * 0.02, nose_x + fw * 0.07, nose_bot + fh * 0.03),
        fill=shade,
    )
    mouth_y = cy + fh * rng.uniform(0.24, 0.31)
    mw = fw * rng.uniform(0.14, 0.24)
    lip = _jitter(rng, LIP_COLOURS[rng.integers(len(LIP_COLOURS))], 15)
    mx = cx + shift
    if rng.random() < 0.6:
        d.arc(
            (mx - mw, mouth_y - fh * 0.06, mx + mw, mouth_y + fh * 0.04),
            10,
            170,
            fill=lip,
            width=max(1, int(fh * 0.025)),
        )
    else:
        d.ellipse(
            (mx - mw * 0.8, mouth_y - fh * 0.02, mx + mw * 0.8, mouth_y + fh * 0.04), fill=lip
        )
    if rng.random() < 0.15:  # beard
        d.chord((cx - fw * 0.48, cy + fh * 0.05, cx + fw * 0.48, cy + fh * 0.5), 0, 180, fill=hair)
        d.ellipse(
            (mx - mw * 0.7, mouth_y - fh * 0.02, mx + mw * 0.7, mouth_y + fh * 0.03), fill=lip
        )
    glasses = rng.random()
    if glasses < 0.3:
        frame = tuple(int(v) for v in rng.integers(0, 120, 3))
        sun = glasses < 0.05
        for side in (-1, 1):
            gx = cx + side * spacing + shift
            box = (gx - ew * 1.5, eye_y - eh * 2.2, gx + ew * 1.5, eye_y + eh * 2.2)
            if sun:
                d.ellipse(box, fill=(20, 20, 25), outline=frame, width=2)
            else:
                d.rectangle(
                    box, outline=frame, width=max(1, int(fw * 0.02))
                ) if rng.random() < 0.5 else d.ellipse(
                    box, outline=frame, width=max(1, int(fw * 0.02))
                )
        d.line(
            (cx - spacing + ew * 1.5 + shift, eye_y, cx + spacing - ew * 1.5 + shift, eye_y),
            fill=frame,
            width=2,
        )

    # soft directional light across the face
    light = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    field = np.cos(angle) * light[None, :] + np.sin(angle) * light[:, None]
    strength = rng.uniform(0.0, 0.25)
    arr = np.asarray(layer).astype(np.float32)
    arr[..., :3] *= (1.0 + strength * field)[..., None]
    layer = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")

    roll = float(np.clip(rng.normal(0.0, 8.0), -30, 30))
    layer = layer.rotate(roll, resample=Image.BILINEAR, center=(cx, cy))
    return layer, {"yaw": yaw, "roll": roll}


def _occlude(rng: np.random.Generator, img: Image.Image, s: float) -> Image.Image:
    size = img.width
    area = (0.05 + 0.35 * s) * (0.5 * size) ** 2 * 1.3
    w = math.sqrt(area * rng.uniform(0.5, 2.0))
    h = area / w
    x = size / 2 + rng.normal(0, 0.15 * size) - w / 2
    y = size / 2 + rng.normal(0, 0.15 * size) - h / 2
    kind = rng.integers(0, 3)
    colour = (
        _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 20)
        if kind == 0
        else tuple(int(v) for v in rng.integers(0, 256, 3))
    )
    d = ImageDraw.Draw(img)
    if kind == 1:
        d.rectangle((x, y, x + w, y + h), fill=colour)
    else:
        d.ellipse((x, y, x + w, y + h), fill=colour)
    return img


def _distort(rng: np.random.Generator, img: Image.Image, name: str, s: float) -> Image.Image:
    if name == "occlusion":
        return _occlude(rng, img, s)
    if name == "exposure":
        sign = 1.0 if rng.random() < 0.5 else -1.0
        gain = 2.0 ** (sign * (0.5 + 2.0 * s))
        gamma = 1.0 + sign * -0.3 * s
        arr = np.asarray(img).astype(np.float32) / 255.0
        arr = np.clip(arr * gain, 0.0, 1.0) ** gamma
        return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8))
    if name == "blur":
        return img.filter(ImageFilter.GaussianBlur(0.4 + 2.6 * s))
    if name == "downsample":
        factor = 1.5 + 4.5 * s
        small = max(4, int(round(img.width / factor)))
        down = (Image.BILINEAR, Image.NEAREST, Image.BOX)[rng.integers(3)]
        up = (Image.BILINEAR, Image.BICUBIC, Image.NEAREST)[rng.integers(3)]
        return img.resize((small, small), down).resize(img.size, up)
    if name == "noise":
        sigma = 3.0 + 37.0 * s
        arr = np.asarray(img).astype(np.float32)
        shape = arr.shape if rng.random() < 0.5 else arr.shape[:2] + (1,)
        arr = arr + rng.normal(0.0, sigma, shape).astype(np.float32)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if name == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(round(70 - 65 * s)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    raise ValueError(f"unknown distortion {name!r}")


def mos_formula(distortions: dict[str, float], yaw: float, roll: float) -> float:
    """The noiseless quality of a sample on the 1-5 scale (see module docstring)."""
    pose = min(1.0, (abs(yaw) / 0.35 + abs(roll) / 20.0) / 2.0)
    q = 1.0 - POSE_WEIGHT * pose
    for name, s in distortions.items():
        q *= 1.0 - DISTORTION_WEIGHTS[name] * s**0.8
    return 1.0 + 4.0 * q


def make_sample(seed: int, split: str, index: int, image_size: int = 112) -> Sample:
    """Draw sample ``index`` of ``split``; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    big = image_size * 2
    canvas = _background(rng, big)
    face, pose = _draw_face(rng, big)
    canvas.paste(face, (0, 0), face)
    img = canvas.resize((image_size, image_size), Image.LANCZOS)

    n = int(rng.choice([0, 1, 2, 3], p=[0.15, 0.35, 0.3, 0.2]))
    picked = set(rng.choice(len(DISTORTION_ORDER), size=n, replace=False).tolist())
    distortions = {
        name: round(float(rng.uniform(0.0, 1.0)), 4)
        for i, name in enumerate(DISTORTION_ORDER)
        if i in picked
    }
    for name, s in distortions.items():
        img = _distort(rng, img, name, s)
    mos = mos_formula(distortions, pose["yaw"], pose["roll"]) + rng.normal(0.0, RATER_NOISE)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    prefix = {
        "labeled_train": "ltr",
        "labeled_val": "lva",
        "test": "tst",
        "unlabeled_1": "u1",
        "unlabeled_2": "u2",
    }[split]
    return Sample(
        key=f"{prefix}-{index:07d}",
        jpeg=buf.getvalue(),
        mos=round(float(np.clip(mos, 1.0, 5.0)), 4),
        distortions=distortions,
        pose={k: round(v, 4) for k, v in pose.items()},
    )


def _write_shard(args: tuple[int, str, int, int, int, str]) -> list[tuple[str, float, str]]:
    seed, split, start, stop, image_size, path = args
    labeled = split not in UNLABELED
    truth = []
    tmp = f"{path}.tmp"
    with wds.TarWriter(tmp) as sink:
        for i in range(start, stop):
            s = make_sample(seed, split, i, image_size)
            meta = {"synthetic": True}
            if labeled:
                meta.update(mos=s.mos, distortions=s.distortions, pose=s.pose)
            sink.write({"__key__": s.key, "jpg": s.jpeg, "json": json.dumps(meta).encode()})
            truth.append((s.key, s.mos, json.dumps(s.distortions)))
    os.replace(tmp, path)
    return truth


def make_demo_data(
    out: str | Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    shard_size: int = 500,
    image_size: int = 112,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write WebDataset shards for every split under ``out``; returns the summary.

    Layout: ``out/<split>/<split>-NNNNNN.tar`` for each split, the unlabeled
    pools' ground truth in ``out/ground_truth/<split>.csv`` (key, mos,
    distortions), and ``out/dataset.json`` describing what was generated.
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {list(SPLITS)}")
    if shard_size < 1 or image_size < 32:
        raise ValueError("shard_size must be >= 1 and image_size >= 32")
    out = Path(local_output_dir(out))
    jobs = []
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        for shard, start in enumerate(range(0, sizes[split], shard_size)):
            stop = min(start + shard_size, sizes[split])
            path = str(out / split / f"{split}-{shard:06d}.tar")
            jobs.append((seed, split, start, stop, image_size, path))
    workers = workers or os.cpu_count() or 1
    truths: dict[str, list] = {s: [] for s in SPLITS}
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        results = pool.map(_write_shard, jobs) if pool else map(_write_shard, jobs)
        for job, rows in zip(jobs, results, strict=True):
            truths[job[1]].extend(rows)
            if progress:
                progress(job[3] - job[2])
    (out / "ground_truth").mkdir(exist_ok=True)
    for split in UNLABELED:
        with open(out / "ground_truth" / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "mos", "distortions"])
            w.writerows(truths[split])
    summary = {
        "seed": seed,
        "image_size": image_size,
        "shard_size": shard_size,
        "sizes": sizes,
        "label_field": "mos",
        "mos_scale": [1.0, 5.0],
        "distortion_weights": DISTORTION_WEIGHTS,
        "splits": {s: sorted(str(p.name) for p in (out / s).glob("*.tar")) for s in SPLITS},
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2))
    return summary
