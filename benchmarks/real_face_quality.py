"""A real-face FIQA benchmark: real aligned faces, a distortion recipe of its own, a
full-reference label, and the whole recipe run on it over several seeds.

    python benchmarks/real_face_quality.py build --faces ../shared/data/real-faces --out data/realface
    python benchmarks/real_face_quality.py run --data data/realface --seeds 0 1 2

``build`` reads WebDataset shards of aligned face crops (``NAME.jpg`` + ``NAME.json`` =
``{"identity": ...}``) and writes the layout `fiqa make-demo-data` writes (``<split>/<split>-
NNNNNN.tar``, ``ground_truth/unlabeled_{1,2}.csv``, ``dataset.json``), so `fiqa run
configs/demo.yaml` runs on it unchanged. The demo's defaults were tuned on the synthetic
faces; this set was tuned to nothing, which is the point of it.

Splits. The test split is identity-disjoint from every other split, and so is labeled_val
(it picks the best epoch and fits the calibration, so it should judge unseen people as the
test does); labeled_train and the two unlabeled pools share the remaining identities. Whole
identities are drawn for test, then for labeled_val, from the seed: of 256 random orders of
the identities, the one whose shortest prefix reaching the split's size overshoots it least
(the overshoot is left unused). Every source image is used at most once.

Distortions. Each image gets 0-3 of them (probabilities 0.10, 0.35, 0.35, 0.20), picked
uniformly, each at a severity ``s ~ U(0, 1)``, applied in this order:

=============  =============================================================================
exposure       +/-(0.5 + 1.5 s) stops in linear light (gamma 2.2), clipped at black and white
haze           blend towards a veil by a = 0.15 + 0.6 s: a light grey (haze) or the image's
               mean (contrast loss)
motion_blur    a line kernel of 2 + 13 s px at a uniform random angle
gaussian_blur  Gaussian blur, sigma 0.5 + 2.5 s px
resample       down by 1.3 + 3.7 s (box or bilinear), back up (bilinear or bicubic)
noise          Gaussian (sigma 2 + 23 s, per channel or luma only) or Poisson-like shot
               noise (10**(2.7 - 1.3 s) photons at white)
jpeg           JPEG re-encode at quality 5 + 70 (1 - s)**1.5
=============  =============================================================================

Label. Full-reference, against the pristine source, on 8-bit luma (BT.601) of both (the
distorted image as stored, after its JPEG-95 encoding, as the models will see it)::

    SSIM = SSIM(ref, dist)          Wang et al. 2004: Gaussian window 11, sigma 1.5
    GMSD = GMSD(ref, dist)          Xue et al. 2014: 2x2 mean-pooled, Prewitt, c = 170
    d    = (1 - SSIM) + 2 GMSD      SSIM alone forgives blur and blocking on 112 px faces
    E    = 2 ** -(0.5 |log2((mean(dist) + 16) / (mean(ref) + 16))|
                  + 1.5 max(0, clipped(dist) - clipped(ref)))   clipped: share of luma <= 3
                                                                or >= 252
    q    = E / (1 + (d / 0.45) ** 2)
    mos  = clip(1 + 4 q + e, 1, 5),   e ~ N(0, 0.15)   (rater noise)

One distortion at full severity lands between 2 and 2.5, two or three of them lower; an
untouched image near 5.

Everything about a sample (its distortions, severities, noise and label) is a function of
(seed, the source image's bytes, split), whatever the number of processes.

``run`` runs the recipe once per seed (``python -m fiqa.cli run CONFIG --set ...``) into
``<runs>/seed-S`` (a rerun resumes: the pipeline skips finished stages), then prints each
model's test SRCC and PLCC (mean +/- std over the seeds), GFLOPs, and the differences the
recipe is about.

Licence: the faces in ../shared/data/real-faces come from Glint360k (non-commercial research
only). This script reads them when it builds; never copy them, or a build made from them, into
the repository, its tests or its container image.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter

from fiqa.data.synthetic import SPLITS, UNLABELED  # the dataset layout `fiqa run` reads
from fiqa.models.allocator import retain_freed_memory

# The regime pseudo-labeling is for: few labels, a pool 20 times larger.
DEFAULT_SIZES = {
    "labeled_train": 400,
    "labeled_val": 150,
    "test": 1000,
    "unlabeled_1": 4000,
    "unlabeled_2": 4000,
}
KEY_PREFIX = {
    "labeled_train": "rf-ltr",
    "labeled_val": "rf-lva",
    "test": "rf-tst",
    "unlabeled_1": "rf-u1",
    "unlabeled_2": "rf-u2",
}
# What the severity s in [0, 1] of each distortion sets, in the order they are applied.
RECIPE = {
    "exposure": "+/-(0.5 + 1.5 s) stops in linear light (gamma 2.2), clipped",
    "haze": "blend towards a light grey (haze) or the image mean (contrast), a = 0.15 + 0.6 s",
    "motion_blur": "line kernel of 2 + 13 s px at a random angle",
    "gaussian_blur": "sigma 0.5 + 2.5 s px",
    "resample": "down by 1.3 + 3.7 s (box or bilinear), back up (bilinear or bicubic)",
    "noise": "Gaussian, sigma 2 + 23 s, or shot noise, 10**(2.7 - 1.3 s) photons at white",
    "jpeg": "quality 5 + 70 (1 - s)**1.5",
}
DISTORTIONS = tuple(RECIPE)
LABEL = (
    "d = (1 - SSIM) + 2 GMSD on luma against the pristine source; E: exposure shift and "
    "clipping; q = E / (1 + (d / 0.45)**2); mos = clip(1 + 4 q + N(0, 0.15), 1, 5)"
)
COUNT_PROBS = (0.10, 0.35, 0.35, 0.20)  # 0, 1, 2 or 3 distortions
RATER_NOISE = 0.15
STORE_QUALITY = 95
IDENTITY_ORDERS = 256  # random orders of the identities tried per identity-disjoint split
MODELS = ("teacher", "teacher_plus", "student", "student_labeled_only")
DELTAS = {
    "student - teacher": ("student", "teacher"),
    "teacher_plus - teacher": ("teacher_plus", "teacher"),
    "student - student_labeled_only": ("student", "student_labeled_only"),
}


# Sources ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One source face: where its JPEG lies in its shard, and whose face it is."""

    shard: str
    key: str
    offset: int
    size: int
    identity: str

    @property
    def name(self) -> str:
        return f"{Path(self.shard).name}/{self.key}"


def scan_faces(faces: str | Path) -> list[Source]:
    """Every sample of the ``*.tar`` shards in ``faces`` with a ``jpg`` and an identity."""
    shards = sorted(Path(faces).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"--faces {str(faces)!r}: no *.tar shards there")
    out = []
    for shard in shards:
        jpgs, ids = {}, {}
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition("/")[2].partition(".")
                if ext == "jpg":
                    jpgs[key] = (m.offset_data, m.size)
                elif ext == "json":
                    ids[key] = json.loads(tar.extractfile(m).read())["identity"]
        out += [Source(str(shard), k, *jpgs[k], ids[k]) for k in sorted(jpgs) if k in ids]
    return out


def _pick_identities(
    counts: dict[str, int], need: int, rng: np.random.Generator, split: str
) -> list[str]:
    """Whole identities with at least ``need`` images: of random orders, the one whose
    shortest prefix reaching ``need`` overshoots it least (the first such, on ties)."""
    if need == 0:
        return []
    names = sorted(counts)
    if sum(counts.values()) < need:
        raise ValueError(
            f"{split} wants {need} images, the identities left have {sum(counts.values())}"
        )
    best, best_over = None, None
    for _ in range(IDENTITY_ORDERS):
        picked, total = [], 0
        for i in rng.permutation(len(names)):
            picked.append(names[i])
            total += counts[names[i]]
            if total >= need:
                break
        if best_over is None or total - need < best_over:
            best, best_over = picked, total - need
    return sorted(best)


def plan_splits(
    sources: list[Source], sizes: dict[str, int], seed: int
) -> tuple[dict[str, list[Source]], dict[str, list[str]]]:
    """Which source images each split gets, and its identities (test and labeled_val own
    theirs; the other splits share the rest)."""
    rng = np.random.default_rng([seed, 0x1D])
    by_id: dict[str, list[Source]] = defaultdict(list)
    for s in sources:
        by_id[s.identity].append(s)
    counts = {k: len(v) for k, v in by_id.items()}
    identities = {}
    for split in ("test", "labeled_val"):
        identities[split] = _pick_identities(counts, sizes[split], rng, split)
        for name in identities[split]:
            del counts[name]
    rest = sorted(counts)
    plan: dict[str, list[Source]] = {}
    for split in ("test", "labeled_val"):
        images = [s for name in identities[split] for s in by_id[name]]
        plan[split] = [images[i] for i in rng.permutation(len(images))[: sizes[split]]]
    images = [s for name in rest for s in by_id[name]]
    shared = ("labeled_train", "unlabeled_1", "unlabeled_2")
    need = sum(sizes[s] for s in shared)
    if need > len(images):
        raise ValueError(
            f"{', '.join(shared)} want {need} images, but the {len(rest)} identities left "
            f"after test and labeled_val have {len(images)}: ask for fewer with --sizes"
        )
    order = rng.permutation(len(images))
    start = 0
    for split in shared:
        plan[split] = [images[i] for i in order[start : start + sizes[split]]]
        start += sizes[split]
    for split in shared:
        identities[split] = sorted({s.identity for s in plan[split]})
    return {s: plan[s] for s in SPLITS}, {s: identities[s] for s in SPLITS}


# Distortions --------------------------------------------------------------------------------------
def _exposure(rng: np.random.Generator, x: np.ndarray, s: float) -> np.ndarray:
    stops = (0.5 + 1.5 * s) * (1.0 if rng.random() < 0.5 else -1.0)
    linear = (x / 255.0) ** 2.2 * 2.0**stops
    return 255.0 * np.clip(linear, 0.0, 1.0) ** (1 / 2.2)


def _haze(rng: np.random.Generator, x: np.ndarray, s: float) -> np.ndarray:
    a = 0.15 + 0.6 * s
    veil = rng.uniform(170.0, 240.0) if rng.random() < 0.5 else float(x.mean())
    return (1.0 - a) * x + a * veil


def _line_kernel(length: float, angle: float) -> np.ndarray:
    """A normalised line of ``length`` px at ``angle``, splatted bilinearly."""
    r = int(math.ceil(length / 2)) + 1
    k = np.zeros((2 * r + 1, 2 * r + 1))
    for t in np.linspace(-length / 2, length / 2, max(3, int(math.ceil(length)) * 3)):
        x, y = r + t * math.cos(angle), r + t * math.sin(angle)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        k[y0, x0] += (1 - fx) * (1 - fy)
        k[y0, x0 + 1] += fx * (1 - fy)
        k[y0 + 1, x0] += (1 - fx) * fy
        k[y0 + 1, x0 + 1] += fx * fy
    return k / k.sum()


def _motion_blur(rng: np.random.Generator, x: np.ndarray, s: float) -> np.ndarray:
    k = _line_kernel(2.0 + 13.0 * s, rng.uniform(0.0, math.pi))
    r = k.shape[0] // 2
    padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    out = np.zeros_like(x)
    for dy, dx in zip(*np.nonzero(k), strict=True):  # a sum over the line's taps only
        out += k[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return out


def _gaussian_blur(rng: np.random.Generator, x: np.ndarray, s: float) -> np.ndarray:
    img = Image.fromarray(_to_uint8(x)).filter(ImageFilter.GaussianBlur(0.5 + 2.5 * s))
    return np.asarray(img, dtype=np.float64)


def _resample(rng: np.random.Generator, x: np.ndarray, s: float) -> np.ndarray:
    h, w = x.shape[:2]
    f = 1.3 + 3.7 * s
    down = (Image.BOX, Image.BILINEAR)[rng.integers(2)]
    up = (Image.BILINEAR, Image.BICUBIC)[rng.integers(2)]
    img = Image.fromarray(_to_uint8(x))
    small = img.resize((max(4, round(w / f)), max(4, round(h / f))), down)
    return np.asarray(small.resize((w, h), up), dtype=np.float64)


def _noise(rng: np.random.Generator, x: np.ndarray, s: float) -> np.ndarray:
    if rng.random() < 0.5:
        sigma = 2.0 + 23.0 * s
        shape = x.shape if rng.random() < 0.5 else x.shape[:2] + (1,)
        return x + rng.normal(0.0, sigma, shape)
    photons = 10.0 ** (2.7 - 1.3 * s)  # at white; shot noise grows as the square root
    return rng.poisson(np.clip(x, 0, 255) / 255.0 * photons) / photons * 255.0


def _jpeg(rng: np.random.Generator, x: np.ndarray, s: float) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, "JPEG", quality=round(5 + 70 * (1 - s) ** 1.5))
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64)


APPLY = {
    "exposure": _exposure,
    "haze": _haze,
    "motion_blur": _motion_blur,
    "gaussian_blur": _gaussian_blur,
    "resample": _resample,
    "noise": _noise,
    "jpeg": _jpeg,
}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# The label ----------------------------------------------------------------------------------------
_WINDOW = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
_WINDOW /= _WINDOW.sum()


def _window_mean(x: np.ndarray) -> np.ndarray:
    """The Gaussian-weighted local mean over the last two axes ('valid' region only)."""
    rows = sliding_window_view(x, len(_WINDOW), axis=-1) @ _WINDOW  # separable: rows, columns
    return sliding_window_view(rows, len(_WINDOW), axis=-2) @ _WINDOW


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two 8-bit-range luma images, the mean of its map."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b, aa, bb, ab = _window_mean(np.stack([a, b, a * a, b * b, a * b]))
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    return float(np.mean(num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))))


def _luma(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _halve(y: np.ndarray) -> np.ndarray:
    h, w = (y.shape[0] // 2) * 2, (y.shape[1] // 2) * 2
    y = y[:h, :w]
    return (y[0::2, 0::2] + y[1::2, 0::2] + y[0::2, 1::2] + y[1::2, 1::2]) / 4


def _prewitt(y: np.ndarray) -> np.ndarray:
    p = np.pad(y, 1, mode="edge")
    gx = (p[:-2, 2:] + p[1:-1, 2:] + p[2:, 2:] - p[:-2, :-2] - p[1:-1, :-2] - p[2:, :-2]) / 3
    gy = (p[2:, :-2] + p[2:, 1:-1] + p[2:, 2:] - p[:-2, :-2] - p[:-2, 1:-1] - p[:-2, 2:]) / 3
    return np.hypot(gx, gy)


def gmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Gradient magnitude similarity deviation (Xue et al. 2014) of two 8-bit-range luma
    images: 2x2 mean-pooled, Prewitt gradients, c = 170; 0 for identical images."""
    ga, gb = _prewitt(_halve(a)), _prewitt(_halve(b))
    return float(np.std((2 * ga * gb + 170) / (ga**2 + gb**2 + 170)))


def label_terms(ref: np.ndarray, dist: np.ndarray) -> dict[str, float]:
    """The label's full-reference terms (see the module docstring): SSIM, GMSD, E and q."""
    yr, yd = np.rint(_luma(ref)), np.rint(_luma(dist))
    s, g = ssim(yr, yd), gmsd(yr, yd)

    def clipped(y: np.ndarray) -> float:
        return float(np.mean((y <= 3) | (y >= 252)))

    shift = abs(math.log2((yd.mean() + 16) / (yr.mean() + 16)))
    e = 2.0 ** -(0.5 * shift + 1.5 * max(0.0, clipped(yd) - clipped(yr)))
    d = max(0.0, 1.0 - s) + 2.0 * g
    return {"ssim": s, "gmsd": g, "exposure": e, "q": e / (1.0 + (d / 0.45) ** 2)}


# One sample, one shard ----------------------------------------------------------------------------
def _source_words(jpeg: bytes) -> list[int]:
    digest = hashlib.sha256(jpeg).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def make_sample(seed: int, split: str, jpeg: bytes, image_size: int) -> dict:
    """Distort one source image and label it: a pure function of (seed, split, jpeg)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), *_source_words(jpeg)])
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.LANCZOS)
    ref = np.asarray(img, dtype=np.float64)
    n = int(rng.choice(len(COUNT_PROBS), p=COUNT_PROBS))
    picked = set(rng.choice(len(DISTORTIONS), size=n, replace=False).tolist())
    distortions = {
        name: round(float(rng.uniform(0.0, 1.0)), 4)
        for i, name in enumerate(DISTORTIONS)
        if i in picked
    }
    x = ref
    for name, s in distortions.items():
        x = APPLY[name](rng, x, s)
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, "JPEG", quality=STORE_QUALITY)
    stored = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float64)
    terms = label_terms(ref, stored)  # the image as the model will see it
    mos = float(np.clip(1.0 + 4.0 * terms["q"] + rng.normal(0.0, RATER_NOISE), 1.0, 5.0))
    return {"jpeg": buf.getvalue(), "mos": round(mos, 4), "distortions": distortions}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: same seed, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shard(job: tuple) -> list[dict]:
    """Write one output shard; returns a row per sample (key, mos, distortions, identity).

    Written with tarfile, as WebDataset lays a sample out (``KEY.jpg``, ``KEY.json``):
    importing webdataset would import torch into every worker, for nothing."""
    seed, split, start, sources, image_size, path = job
    rows = []
    tmp = f"{path}.tmp"
    with contextlib.ExitStack() as stack:
        tar = stack.enter_context(tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT))
        handles: dict[str, io.BufferedReader] = {}
        for i, src in enumerate(sources, start):
            if src.shard not in handles:
                handles[src.shard] = stack.enter_context(open(src.shard, "rb"))
            f = handles[src.shard]
            f.seek(src.offset)
            sample = make_sample(seed, split, f.read(src.size), image_size)
            key = f"{KEY_PREFIX[split]}-{i:07d}"
            meta = {"identity": src.identity, "source": src.name}
            if split not in UNLABELED:
                meta.update(mos=sample["mos"], distortions=sample["distortions"])
            _add(tar, f"{key}.jpg", sample["jpeg"])
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            rows.append(
                {
                    "key": key,
                    "mos": sample["mos"],
                    "distortions": sample["distortions"],
                    "identity": src.identity,
                }
            )
    os.replace(tmp, path)
    return rows


# build --------------------------------------------------------------------------------------------
def histogram(values: list[float], lo: float = 1.0, hi: float = 5.0, bins: int = 8) -> dict:
    v = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return {
        "n": int(v.size),
        "mean": round(float(v.mean()), 4) if v.size else None,
        "std": round(float(v.std()), 4) if v.size else None,
        "percentiles": {
            str(p): round(float(np.percentile(v, p)), 4) for p in (1, 10, 25, 50, 75, 90, 99)
        }
        if v.size
        else {},
        "bins": [f"{a:.1f}-{b:.1f}" for a, b in zip(edges[:-1], edges[1:], strict=True)],
        "counts": counts.tolist(),
    }


def histogram_text(h: dict) -> str:
    if not h["n"]:
        return "no labels"
    width = 40 / max(1, max(h["counts"]))
    bars = zip(h["bins"], h["counts"], strict=True)
    lines = [f"  {b}  {c:>6}  {'#' * round(c * width)}" for b, c in bars]
    p = h["percentiles"]
    lines.append(
        f"  n {h['n']}, mean {h['mean']:.2f}, std {h['std']:.2f}, "
        f"p1 {p['1']:.2f}, p10 {p['10']:.2f}, median {p['50']:.2f}, p90 {p['90']:.2f}, "
        f"p99 {p['99']:.2f}"
    )
    return "\n".join(lines)


def build(
    faces: str | Path,
    out: str | Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    shard_size: int = 500,
    image_size: int = 112,
    workers: int | None = None,
    log=print,
) -> dict:
    """Write the benchmark under ``out`` (the layout of `fiqa make-demo-data`); returns its
    ``dataset.json``."""
    t0 = time.perf_counter()
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    if set(sizes) - set(SPLITS) or min(sizes.values()) < 0 or shard_size < 1:
        raise ValueError(f"sizes must be SPLIT=N, N >= 0, with SPLIT one of {list(SPLITS)}")
    sources = scan_faces(faces)
    ids = Counter(s.identity for s in sources)
    log(f"faces: {len(sources)} images of {len(ids)} identities in {faces}")
    plan, identities = plan_splits(sources, sizes, seed)
    for split in ("test", "labeled_val"):
        log(f"{split} identities ({len(identities[split])}): {', '.join(identities[split])}")

    out = Path(out)
    jobs = []
    for split in SPLITS:
        folder = out / split
        if folder.exists():  # a previous build's shards must not linger beside this one's
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for shard, start in enumerate(range(0, sizes[split], shard_size)):
            chunk = plan[split][start : start + shard_size]
            path = str(folder / f"{split}-{shard:06d}.tar")
            jobs.append((seed, split, start, chunk, image_size, path))
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    done = 0
    # The same few image-sized arrays are freed and allocated per image: keep them on the heap.
    with ProcessPoolExecutor(workers, initializer=retain_freed_memory) as pool:
        for job, result in zip(jobs, pool.map(write_shard, jobs), strict=True):
            rows[job[1]].extend(result)
            done += len(result)
            log(
                f"  {Path(job[5]).name}: {len(result)} images "
                f"({done}/{sum(sizes.values())}, {time.perf_counter() - t0:.1f} s)"
            )

    (out / "ground_truth").mkdir(exist_ok=True)
    for split in UNLABELED:
        with open(out / "ground_truth" / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "mos", "distortions"])
            w.writerows((r["key"], r["mos"], json.dumps(r["distortions"])) for r in rows[split])
    labels = [r["mos"] for split in SPLITS for r in rows[split]]
    seconds = time.perf_counter() - t0
    summary = {
        "benchmark": "real_face_quality",
        "faces": str(faces),
        "seed": seed,
        "image_size": image_size,
        "shard_size": shard_size,
        "sizes": sizes,
        "label_field": "mos",
        "mos_scale": [1.0, 5.0],
        "distortions": RECIPE,
        "label": LABEL,
        "distortion_counts": dict(zip(range(len(COUNT_PROBS)), COUNT_PROBS, strict=True)),
        "rater_noise": RATER_NOISE,
        "identity_split": "test and labeled_val: whole identities of their own; "
        "labeled_train, unlabeled_1, unlabeled_2: the rest, shared",
        "identities": identities,
        "label_histogram": histogram(labels),
        "label_histogram_by_split": {s: histogram([r["mos"] for r in rows[s]]) for s in SPLITS},
        "splits": {s: sorted(p.name for p in (out / s).glob("*.tar")) for s in SPLITS},
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote {len(labels)} images to {out} in {seconds:.1f} s ({workers} processes)")
    for split in SPLITS:
        h = summary["label_histogram_by_split"][split]
        if h["n"]:
            log(f"  {split}: {h['n']} images, mos mean {h['mean']:.2f}, std {h['std']:.2f}")
    log("labels (MOS, all splits):\n" + histogram_text(summary["label_histogram"]))
    return summary


# run ----------------------------------------------------------------------------------------------
def run_command(config: str, data: Path, seed: int, run_dir: str, sets: list[str]) -> list[str]:
    """`fiqa run` on the benchmark: every data path, the seed and the run dir, then ``sets``
    (last, so a user's value wins)."""
    paths = {s: data / s for s in SPLITS}
    paths.update({f"{s}_truth": data / "ground_truth" / f"{s}.csv" for s in UNLABELED})
    items = [f"data.{k}={v}" for k, v in paths.items()]
    items += [f"seed={seed}", f"run_dir={run_dir}", *sets]
    return [
        sys.executable,
        "-m",
        "fiqa.cli",
        "run",
        config,
        *(a for i in items for a in ("--set", i)),
    ]


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarise(per_seed: dict[int, dict]) -> dict:
    """Mean and std over seeds (ddof 1) of each model's SRCC and PLCC, and of the differences."""
    models = {}
    for m in MODELS:
        got = [r["models"][m] for r in per_seed.values() if m in r["models"]]
        if not got:
            continue
        models[m] = {"gflops": got[0]["gflops"]}
        for metric in ("srcc", "plcc"):
            models[m][metric], models[m][f"{metric}_std"] = _mean_std([g[metric] for g in got])
    deltas = {}
    for name, (a, b) in DELTAS.items():
        pairs = [r["models"] for r in per_seed.values() if a in r["models"] and b in r["models"]]
        if not pairs:
            continue
        deltas[name] = {}
        for metric in ("srcc", "plcc"):
            mean, std = _mean_std([p[a][metric] - p[b][metric] for p in pairs])
            deltas[name][metric], deltas[name][f"{metric}_std"] = mean, std
    return {"models": models, "deltas": deltas}


def table_text(summary: dict, per_seed: dict[int, dict]) -> str:
    def pm(d: dict, metric: str, signed: bool = False) -> str:
        f = "{:+.4f}" if signed else "{:.4f}"
        return f"{f.format(d[metric])} ± {d[metric + '_std']:.4f}"

    rows = [["model", "test SRCC", "test PLCC", "GFLOPs"]]
    for m, d in summary["models"].items():
        rows.append([m, pm(d, "srcc"), pm(d, "plcc"), f"{d['gflops']:.3f}"])
    rows.append(None)
    for name, d in summary["deltas"].items():
        rows.append([name, pm(d, "srcc", True), pm(d, "plcc", True), ""])
    cells = [r for r in rows if r]
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    lines = [
        f"real-face benchmark, {len(per_seed)} seed(s) ({', '.join(map(str, per_seed))}): "
        "mean ± std over seeds (std with ddof 1; 0 for one seed)",
        "",
    ]
    for r in rows:
        if r is None:
            lines.append("-" * (sum(widths) + 6))
            continue
        line = r[0].ljust(widths[0]) + "".join(
            "  " + c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        )
        lines.append(line.rstrip())
    lines.append("")
    for name in ("self_training", "distillation"):
        got = {s: r["intervals"][name]["srcc"] for s, r in per_seed.items()
               if name in r.get("intervals", {})}  # fmt: skip
        if got:
            lines.append(
                f"{name} SRCC, 95 % paired bootstrap interval over the test images: "
                + ", ".join(
                    f"seed {s} {d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
                    for s, d in got.items()
                )
            )
    lines.append(
        "wall time per seed (this invocation; finished stages are skipped): "
        + ", ".join(f"seed {s} {r['wall_s']:.0f} s" for s, r in per_seed.items())
    )
    return "\n".join(lines)


def read_run(run_dir: str, wall_s: float | None = None) -> dict:
    """A finished run's figures from its ``evaluate/report.json``: each model's test SRCC,
    PLCC and GFLOPs, and the report's paired intervals of the differences."""
    from fiqa import storage

    report = storage.read_json(f"{run_dir}/evaluate/report.json")
    return {
        "run_dir": run_dir,
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "models": {
            m: {k: report[m][k] for k in ("srcc", "plcc", "gflops")} for m in MODELS if m in report
        },
        # the report's paired bootstrap intervals over the test images, per difference
        "intervals": report.get("intervals", {}).get("deltas", {}),
    }


def run_seed(data: Path, seed: int, config: str, run_dir: str, sets: list[str]) -> dict:
    """`fiqa run` once (it resumes a run_dir it finished part of), then ``read_run``."""
    cmd = run_command(config, data, seed, run_dir, sets)
    print(f"seed {seed}: python {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: fiqa run failed ({proc.returncode}); rerun resumes")
    print(f"seed {seed}: done in {wall:.0f} s", flush=True)
    return read_run(run_dir, wall)


def run_seeds(
    data: str | Path,
    seeds: list[int],
    config: str,
    runs: str,
    sets: list[str],
    json_path: str | None = None,
) -> dict:
    data = Path(data).resolve()
    if not (data / "dataset.json").is_file():
        raise FileNotFoundError(f"--data {str(data)!r}: no dataset.json (build it first)")
    per_seed: dict[int, dict] = {}
    for seed in seeds:
        per_seed[seed] = run_seed(data, seed, config, f"{runs.rstrip('/')}/seed-{seed}", sets)
    summary = summarise(per_seed)
    print("\n" + table_text(summary, per_seed))
    result = {
        "data": str(data),
        "config": config,
        "sets": sets,
        "seeds": seeds,
        "per_seed": per_seed,
        **summary,
    }
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
        print(f"figures: {json_path}")
    return result


# main ---------------------------------------------------------------------------------------------
def _sizes(items: list[str]) -> dict[str, int]:
    sizes = {}
    for item in items:
        split, _, n = item.partition("=")
        if split not in SPLITS or not n.isdigit():
            raise SystemExit(f"--sizes {item!r}: expected SPLIT=N with SPLIT one of {SPLITS}")
        sizes[split] = int(n)
    return sizes


def main(argv: list[str] | None = None) -> int:
    from harness import REAL_FACES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the benchmark's shards from real face shards")
    b.add_argument("--faces", default=str(REAL_FACES), help="folder of *.tar face shards")
    b.add_argument("--out", required=True, help="folder to write the benchmark to")
    b.add_argument("--seed", type=int, default=0, help="splits, distortions, rater noise")
    b.add_argument("--sizes", nargs="*", default=[], metavar="SPLIT=N", help="images per split")
    b.add_argument("--shard-size", type=int, default=500, help="images per output shard")
    b.add_argument("--image-size", type=int, default=112, help="output side in px")
    b.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    r = sub.add_parser("run", help="run the recipe on a built benchmark, once per seed")
    r.add_argument("--data", required=True, help="the folder `build` wrote")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds")
    r.add_argument("--config", default="configs/demo.yaml", help="the run config")
    r.add_argument("--runs", default="runs/realface", help="runs go to RUNS/seed-S")
    r.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides",
    )
    r.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.command == "build":
        try:
            build(
                args.faces,
                args.out,
                seed=args.seed,
                sizes=_sizes(args.sizes),
                shard_size=args.shard_size,
                image_size=args.image_size,
                workers=args.workers,
                log=lambda line: print(line, flush=True),
            )
        except (ValueError, FileNotFoundError) as e:  # the sizes or the folder: say which
            raise SystemExit(f"build: {e}") from None
    else:
        run_seeds(args.data, args.seeds, args.config, args.runs, args.set, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
