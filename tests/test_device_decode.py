"""Decoding in the scoring actor (`fiqa.scoring.device_decode`): the same pixels, scores and
reject reasons as the CPU decode tasks.

Everything here runs on the CPU (torchvision's libjpeg-turbo) everywhere; where CUDA is
there, the actor's tests run on the GPU (nvJPEG) as well. Faces are the real ones beside the
repository when present (../shared/data/real-faces, or $FIQA_REAL_FACES), else the project's
synthetic faces.
"""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.stats import spearmanr
from test_bad_inputs import (
    CASES,
    MAX_PIXELS,
    cmyk_jpeg,
    corrupted_jpeg,
    encode,
    exif_rotated,
    noise_jpeg,
)

from fiqa.config import ScoringConfig
from fiqa.data.decode import RejectedSample, decode_image, gpu_decodable
from fiqa.data.reader import read_shard
from fiqa.models import create_model, save_checkpoint
from fiqa.scoring import ScoreJob
from fiqa.scoring.decode_task import read_and_decode
from fiqa.scoring.device_decode import decode_batch
from fiqa.scoring.scorer import Scorer

from conftest import jpeg_bytes, write_tar

REAL_FACES = Path(
    os.environ.get("FIQA_REAL_FACES")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "real-faces"
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# On the 1-5 MOS scale: resampling and JPEG decoders round differently, by about a level.
SCORE_TOLERANCE = 0.05


def faces(n: int) -> list[bytes]:
    """``n`` face JPEGs: real ones where the shared data is, synthetic ones elsewhere."""
    shards = sorted(REAL_FACES.glob("*.tar"))
    if shards:
        return [r["image"] for r in read_shard(str(shards[0]))][:n]
    from fiqa.data.synthetic import make_sample

    return [make_sample(0, "unlabeled_1", i).jpeg for i in range(n)]


def test_which_images_go_to_the_gpu_decoder():
    def probe(data, resize=64):
        return gpu_decodable(data, MAX_PIXELS, 16, resize)

    assert probe(jpeg_bytes((120, 90))) and probe(jpeg_bytes((40, 40), color=90, mode="L"))
    assert probe(noise_jpeg() + b"\0\0")  # padding after the end marker is fine
    from PIL import Image

    img = Image.new("RGB", (64, 64), (10, 20, 30))
    refused = {
        "png": encode(img, "PNG"),
        "webp": encode(img, "WEBP"),
        "cmyk": cmyk_jpeg(),
        "exif rotation": exif_rotated(),
        "progressive": encode(img, "JPEG", progressive=True),
        "truncated": noise_jpeg()[:3000],
        "large for the target": jpeg_bytes((1024, 1024)),
    }
    for name, data in refused.items():
        assert not probe(data), name
    assert probe(jpeg_bytes((1024, 1024)), resize=512)
    assert not probe(corrupted_jpeg())  # a garbled scan header: nvJPEG would decode garbage
    assert all(probe(f, resize=72) for f in faces(32))
    for data, reason in [(b"", "empty_image"), (b"<html>", "not_an_image")]:
        with pytest.raises(RejectedSample, match=reason):
            probe(data)
    with pytest.raises(RejectedSample, match="too_small"):
        probe(jpeg_bytes((8, 8)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resize,crop", [(72, 64), (128, 112), (384, 352), (512, 448)])
def test_device_pixels_match_the_cpu_path(device, resize, crop):
    # more faces of one size than one resampling chunk (RESAMPLE_CHUNK), and two other sizes
    images = faces(70) + [jpeg_bytes((300, 200), color=(30, 60, 200)), jpeg_bytes((90, 160))]
    got, reasons = decode_batch(images, resize, crop, torch.device(device))
    assert reasons == [None] * len(images) and got.shape == (len(images), crop, crop, 3)
    want = np.stack([decode_image(d, resize, crop=crop) for d in images]).astype(int)
    diff = np.abs(got.cpu().numpy().astype(int) - want)
    assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 8


@pytest.mark.parametrize("device", DEVICES)
def test_every_bad_input_gets_the_cpu_paths_reason(device):
    """Routed as the decode task routes them (`gpu_decodable`), then decoded on the device."""
    zoo = {name: next(iter(files.values())) for name, (files, _) in CASES.items()}
    zoo.pop("no_image")  # not an image member at all: the reader's reject, never decoded
    zoo["garbled_scan_header"] = zoo.pop("corrupted_jpeg")
    for name, data in zoo.items():
        try:
            want, why = decode_image(data, 64, MAX_PIXELS, crop=48), None
        except RejectedSample as e:
            want, why = None, e.reason
        try:
            on_device = gpu_decodable(data, MAX_PIXELS, 16, 64)
        except RejectedSample as e:
            assert e.reason == why, name
            continue
        if not on_device:
            continue  # the decode task decodes it with decode_image itself
        got, reasons = decode_batch([data], 64, 48, torch.device(device), MAX_PIXELS)
        assert reasons[0] == why, name
        if want is not None:
            assert np.abs(got[0].cpu().numpy().astype(int) - want).mean() < 1.0, name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("model") / "ck")
    torch.manual_seed(0)
    save_checkpoint(
        ck,
        create_model("resnet10t", 64).eval(),
        {"arch": "resnet10t", "image_size": 64, "resize": 72},
    )
    return ck


def scored(job: ScoreJob, scorer: Scorer) -> pa.Table:
    """The engine's path for one shard without Ray: decode task batches, then the actor."""
    from ray.data.block import BlockAccessor

    outs = []
    for batch in read_and_decode({"shard": np.array(job.shards, dtype=object)}, job):
        outs.append(scorer(BlockAccessor.batch_to_block(batch)))
    return pa.concat_tables(outs)


def test_actor_decoding_scores_like_decode_tasks(checkpoint, tmp_path):
    """A shard of faces and of everything the CPU path must handle: the same rows, the same
    reject reasons, the same scores within SCORE_TOLERANCE on the MOS scale."""
    members = [(f"face{i:03d}.jpg", d) for i, d in enumerate(faces(96))]
    members += [(f"{name}.{ext}", d) for name, (f, _) in CASES.items() for ext, d in f.items()]
    shard = write_tar(tmp_path / "pool.tar", members)
    tables = {}
    for decode in ("tasks", "actor"):
        job = ScoreJob(
            shards=[shard],
            out_dir="",
            source="x",
            model_path=checkpoint,
            resize=72,
            crop=64,
            max_pixels=MAX_PIXELS,
            scoring=ScoringConfig(batch_size=32, decode=decode),
        )
        spec = job.decode_spec() if decode == "actor" else None
        tables[decode] = scored(job, Scorer(checkpoint, decode=spec, batch_size=32))
    cpu, actor = tables["tasks"], tables["actor"]
    assert actor.column("key").to_pylist() == cpu.column("key").to_pylist()
    assert actor.column("reason").to_pylist() == cpu.column("reason").to_pylist()
    ok = np.array([r == "" for r in cpu.column("reason").to_pylist()])
    a, b = cpu.column("raw_score").to_numpy()[ok], actor.column("raw_score").to_numpy()[ok]
    assert ok.sum() >= 96 and not np.isnan(b).any()
    mos = lambda r: 1 + 4 * (r - a.min()) / np.ptp(a)  # noqa: E731  (the raw range onto 1-5)
    assert np.abs(mos(a) - mos(b)).max() <= SCORE_TOLERANCE
    assert spearmanr(a, b)[0] > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_with_one_bad_jpeg_is_decoded_image_by_image(device):
    good = faces(4)
    bad = good[1][:-2] + b"\xff\xd9"  # complete-looking, cut inside its entropy-coded data
    bad = bad[: len(bad) // 3] + b"\xff\xd9"
    got, reasons = decode_batch([good[0], bad, good[2]], 72, 64, torch.device(device))
    want = [decode_image(good[i], 72, crop=64) for i in (0, 2)]
    for j, w in zip((0, 2), want, strict=True):
        assert reasons[j] is None and np.abs(got[j].cpu().numpy().astype(int) - w).mean() < 1.0
    try:
        decode_image(bad, 72, crop=64)
        assert reasons[1] is None  # libjpeg decodes what it can of a cut JPEG: so may the GPU
    except RejectedSample as e:
        assert reasons[1] == e.reason


def test_a_refused_batch_is_said_once_loudly(monkeypatch, caplog):
    """A decoder that fails every batch must not leave the actor decoding on its CPU unseen."""
    from fiqa.scoring import device_decode

    monkeypatch.setattr(device_decode, "_batch_failures", [])
    good = faces(2)
    batch = [good[0], b"\xff\xd8\xff not a JPEG after all \xff\xd9", good[1]]  # JPEG-like
    with caplog.at_level("DEBUG", logger="fiqa.scoring.device_decode"):
        for _ in range(2):
            got, reasons = decode_batch(batch, 72, 64, torch.device("cpu"))
            assert reasons[0] is None and reasons[2] is None and reasons[1] == "not_an_image"
    refused = [r.levelname for r in caplog.records if "refused a batch" in r.message]
    assert refused == ["WARNING", "DEBUG"], refused


@pytest.mark.parametrize("device", DEVICES)
def test_bytes_that_are_no_jpeg_never_reach_the_device_decoder(device, monkeypatch):
    """Other formats (named .jpg or not) go to the CPU path, which rejects them."""
    import torchvision.io

    given: list[bytes] = []
    real = torchvision.io.decode_jpeg

    def spy(data, *args, **kwargs):
        given.extend(bytes(d.numpy()) for d in (data if isinstance(data, list) else [data]))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    from PIL import Image

    tiff = encode(Image.new("RGB", (40, 40), (10, 20, 30)), "TIFF")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\nshowpage\n"
    jpeg = jpeg_bytes((40, 40))
    _, reasons = decode_batch([tiff, jpeg, eps, b""], 32, 32, torch.device(device))
    assert reasons == ["unsupported_format", None, "unsupported_format", "empty_image"]
    assert given == [jpeg]


@pytest.mark.slow
def test_engine_decoding_in_the_actors_writes_the_same_tables(checkpoint, tmp_path):
    """`fiqa label`'s engine on a local Ray, ``scoring.decode`` actor against tasks."""
    import ray

    from fiqa.cli.label import label_shards
    from fiqa.data.tables import read_table

    members = [(f"face{i:03d}.jpg", d) for i, d in enumerate(faces(64))]
    members += [(f"{name}.{ext}", d) for name, (f, _) in CASES.items() for ext, d in f.items()]
    shards = [write_tar(tmp_path / f"pool-{i}.tar", members[i::2]) for i in range(2)]
    tables = {}
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for decode in ("tasks", "actor"):
            out = str(tmp_path / decode)
            scoring = ScoringConfig(batch_size=16, decode=decode, num_cpus=1)
            stats = label_shards(
                checkpoint, shards, out, scoring, max_pixels=MAX_PIXELS, progress=False
            )
            assert stats["shards"] == 2
            tables[decode] = (read_table(f"{out}/labels"), read_table(f"{out}/rejects"))
    finally:
        ray.shutdown()
    (cpu, cpu_rejects), (actor, actor_rejects) = tables["tasks"], tables["actor"]
    assert sorted(actor_rejects.to_pylist(), key=str) == sorted(cpu_rejects.to_pylist(), key=str)
    a = dict(zip(*(cpu.column(c).to_pylist() for c in ("key", "raw_score")), strict=True))
    b = dict(zip(*(actor.column(c).to_pylist() for c in ("key", "raw_score")), strict=True))
    assert a.keys() == b.keys() and len(a) >= 64
    ra, rb = np.array(list(a.values())), np.array([b[k] for k in a])
    assert np.abs(ra - rb).max() <= SCORE_TOLERANCE * np.ptp(ra) / 4
