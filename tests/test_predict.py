"""`fiqa predict`: files, folders and shards, with a checkpoint, an ONNX or a TorchScript export.

Scores are checked against the scoring engine itself (`read_and_decode` and
`Scorer` from `fiqa.scoring.scorer`, which pseudo-labeling runs on Ray): an image
scored here gets the raw score the engine gives it.
"""

import csv
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ray.data.block import BlockAccessor

from fiqa.calibration import Logistic4
from fiqa.models import create_model, export_checkpoint, save_checkpoint
from fiqa.models.predictor import open_predictor
from fiqa.predict import predict, resolve_inputs
from fiqa.scoring import ScoreJob
from fiqa.scoring.decode_task import read_and_decode
from fiqa.scoring.scorer import Scorer

from conftest import fiqa_cmd, jpeg_bytes, subprocess_env, write_tar

SIZE, RESIZE = 32, 40
CALIB = Logistic4(4.6, 1.1, -0.02, 0.25)
COLORS = [(200, 120, 80), (30, 60, 200), (90, 200, 90), (250, 250, 250)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = create_model("resnet10t", SIZE).eval()
    ck = str(root / "ck")
    meta = {"arch": "resnet10t", "image_size": SIZE, "resize": RESIZE}
    save_checkpoint(ck, model, {**meta, "calibration": CALIB.to_dict()})
    onnx_path, ts_path = str(root / "m.onnx"), str(root / "m.pt")
    # The legacy exporter is quicker; test_export covers the default (dynamo) one.
    export_checkpoint(ck, "onnx", onnx_path, exporter="legacy", check=False)
    export_checkpoint(ck, "torchscript", ts_path, check=False)
    return {"checkpoint": ck, "onnx": onnx_path, "torchscript": ts_path}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder (nested, with bad files) and two shards (with bad samples)."""
    root = tmp_path_factory.mktemp("inputs")
    faces = root / "faces"
    (faces / "more").mkdir(parents=True)
    for i, c in enumerate(COLORS[:3]):
        (faces / f"f{i}.jpg").write_bytes(jpeg_bytes(size=(56, 48), color=c))
    (faces / "more" / "f3.png").write_bytes(jpeg_bytes(size=(50, 50), color=COLORS[3], fmt="PNG"))
    (faces / "broken.jpg").write_bytes(jpeg_bytes()[:-50])  # truncated
    (faces / "notes.png").write_bytes(b"this is not an image")
    (faces / "tiny.jpg").write_bytes(jpeg_bytes(size=(8, 8)))
    (faces / "readme.txt").write_text("not picked up: not an image extension")
    shards = root / "shards"
    shards.mkdir()
    members = []
    for i, c in enumerate(COLORS):
        members.append((f"s{i}.jpg", jpeg_bytes(size=(56, 48), color=c)))
        members.append((f"s{i}.json", json.dumps({"mos": 3.0}).encode()))
    members.append(("bad.jpg", b"\xff\xd8 garbage"))
    members.append(("nolabel.json", b"{not json"))  # label problems do not stop scoring...
    members.append(("nolabel.jpg", jpeg_bytes(color=COLORS[0])))
    write_tar(shards / "part-0.tar", members)
    write_tar(shards / "part-1.tar", [("x0.jpg", jpeg_bytes(color=COLORS[1]))])
    return {"faces": str(faces), "shards": str(shards), "root": root}


def by_name(rows):
    return {(r["path"].rsplit("/", 1)[-1], r["key"]): r for r in rows}


def test_calibration_round_trip(models):
    """A checkpoint saved with a Logistic4 predicts Logistic4(raw) on the MOS scale."""
    p = open_predictor(models["checkpoint"], device="cpu")
    assert p.backend == "torch" and p.calibrated and (p.image_size, p.resize) == (SIZE, RESIZE)
    x = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    raw, score = p(x)
    np.testing.assert_allclose(score, CALIB(raw), rtol=0, atol=1e-6)
    assert np.ptp(score) > 1e-3 and np.all((score > 1.1) & (score < 4.6))


def test_scorer_on_arrow_batches_of_several_blocks_with_rejected_rows(models):
    """The actor gets Arrow slices that may span decode blocks (several chunks) and hold
    rejected rows: each scored row gets its own score, rejects none, other columns pass."""
    import pyarrow as pa

    rng = np.random.default_rng(1)
    scorer = Scorer(models["checkpoint"])

    def block(n, first):
        return BlockAccessor.batch_to_block(
            {
                "key": np.array([f"k{first + i}" for i in range(n)], dtype=object),
                "image": np.array([bytes([i]) * 3 for i in range(n)], dtype=object),
                "reason": np.array(["" if (first + i) % 3 else "too_small" for i in range(n)]),
                "pixels": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
            }
        )

    table = pa.concat_tables([block(4, 0), block(5, 4)])
    assert table.column("pixels").num_chunks == 2
    out = scorer(table)
    assert "pixels" not in out.column_names
    assert out.column("key").to_pylist() == [f"k{i}" for i in range(9)]
    assert out.column("image").to_pylist() == table.column("image").to_pylist()
    raw = out.column("raw_score").to_numpy()
    alone = [scorer(table.slice(i, 1)).column("raw_score")[0].as_py() for i in range(9)]
    for i in range(9):
        if i % 3 == 0:
            assert np.isnan(raw[i]) and np.isnan(alone[i])
        else:
            assert abs(raw[i] - alone[i]) < 1e-4


@pytest.mark.parametrize("kind", ["checkpoint", "onnx", "torchscript"])
def test_predict_scores_files_folders_and_shards_like_the_engine(models, inputs, kind):
    p = open_predictor(models[kind], device="cpu", trust_model_code=True)  # our own export
    assert p.backend == {"checkpoint": "torch", "onnx": "onnxruntime"}.get(kind, kind)
    items = [inputs["faces"], f"{inputs['shards']}/part-0.tar", f"{inputs['faces']}/tiny.jpg"]
    rows = list(predict(p, resolve_inputs(items), batch_size=3, workers=2))
    got = by_name(rows)
    # The folder: 4 images (one nested) + 3 bad files; tiny.jpg named twice is scored once.
    assert len(rows) == 7 + 6
    # (decode names a cut-off JPEG truncated_image; older versions said corrupt_image)
    assert got[("broken.jpg", "")]["reason"] in ("truncated_image", "corrupt_image")
    assert got[("notes.png", "")]["reason"] == "not_an_image"
    assert got[("tiny.jpg", "")]["reason"] == "too_small"
    assert got[("part-0.tar", "bad")]["reason"] == "not_an_image"
    for r in rows:
        assert (r["reason"] is None) == (r["score"] is not None) == (r["raw_score"] is not None)
    assert got[("part-0.tar", "nolabel")]["reason"] is None

    # The shard's images scored as the scoring engine scores them (same decode, same model).
    job = ScoreJob(
        shards=[], out_dir="", source="x", model_path=models["checkpoint"], resize=RESIZE, crop=SIZE
    )
    (batch,) = read_and_decode({"shard": [f"{inputs['shards']}/part-0.tar"]}, job)
    engine = Scorer(models["checkpoint"])(BlockAccessor.batch_to_block(batch)).to_pydict()
    for key, reason, raw in zip(engine["key"], engine["reason"], engine["raw_score"], strict=True):
        if not reason:
            r = got[("part-0.tar", key)]
            assert abs(r["raw_score"] - raw) < 1e-4
            assert abs(r["score"] - CALIB(raw)) < 1e-4
    # The same picture as a file and as a shard member gets the same score.
    assert abs(got[("f1.jpg", "")]["score"] - got[("part-0.tar", "s1")]["score"]) < 1e-6
    assert len({round(got[(f"f{i}.jpg", "")]["score"], 6) for i in range(3)}) == 3


def test_backends_agree(models, inputs):
    items = resolve_inputs([inputs["faces"], inputs["shards"]])
    scores = {}
    for kind in ("checkpoint", "onnx", "torchscript"):
        p = open_predictor(models[kind], "cpu", trust_model_code=True)  # our own export
        rows = list(predict(p, items, batch_size=4))
        scores[kind] = np.array([np.nan if r["score"] is None else r["score"] for r in rows])
    for kind in ("onnx", "torchscript"):
        np.testing.assert_allclose(scores[kind], scores["checkpoint"], atol=1e-4)


def test_shard_specs_and_bad_shards(models, inputs, tmp_path):
    p = open_predictor(models["onnx"], "cpu")
    shards = inputs["shards"]
    glob_rows = list(predict(p, resolve_inputs([f"{shards}/*.tar"])))
    brace_rows = list(predict(p, resolve_inputs([f"{shards}/part-{{0..1}}.tar"])))
    assert [r["key"] for r in glob_rows] == [r["key"] for r in brace_rows]
    assert len(glob_rows) == 6 + 1

    write_tar(tmp_path / "empty.tar", [])
    good = tmp_path / "good.tar"
    write_tar(good, [(f"k{i}.jpg", jpeg_bytes(color=COLORS[i])) for i in range(3)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:3000])  # cut inside the second member's padding
    rows = list(predict(p, resolve_inputs([str(tmp_path / "empty.tar"), str(cut)])))
    assert [(r["key"], (r["reason"] or "").split(":")[0]) for r in rows] == [
        ("", "empty_shard"),
        ("k0", ""),  # what was read before the cut is still scored
        ("k1", ""),  # its bytes are whole: only the padding after them is cut
        ("", "truncated_shard"),
    ]

    with pytest.raises(FileNotFoundError, match="names no file"):
        resolve_inputs([str(tmp_path / "missing-*.tar")])
    with pytest.raises(FileNotFoundError, match="holds no image"):
        (tmp_path / "void").mkdir()
        resolve_inputs([str(tmp_path / "void")])


def test_predict_command_writes_files(models, inputs, tmp_path, capsys):
    from fiqa.cli import main

    src = [inputs["faces"], inputs["shards"]]
    out = str(tmp_path / "p.parquet")
    assert main(["predict", models["torchscript"], *src, "-o", out, "--trust-model-code"]) == 0
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert len(table) == 7 + 7 and {"path", "key", "raw_score", "score", "reason"} <= set(table[0])
    assert sum(r["reason"] is not None for r in table) == 4
    assert main(["predict", models["checkpoint"], *src, "-o", str(tmp_path / "p.json")]) == 0
    assert len(json.loads((tmp_path / "p.json").read_text())) == 14
    out = capsys.readouterr().out
    assert "scored 10 of 14" in out and "not_an_image 2" in out

    assert main(["predict", models["onnx"], *src, "-o", str(tmp_path / "p.xlsx")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope.onnx"), *src]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["predict", str(tmp_path / "junk.onnx"), *src]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
    assert main(["predict", models["onnx"], f"{inputs['faces']}/notes.png"]) == 1  # nothing scored


def test_many_images_print_a_summary_and_a_hint(models, tmp_path, capsys):
    from fiqa.cli import main

    for i in range(25):
        (tmp_path / f"{i:02d}.jpg").write_bytes(jpeg_bytes(color=(i * 10, 100, 50)))
    assert main(["predict", models["onnx"], str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "scored 25 of 25" in out and "hint: add -o" in out and "00.jpg" not in out


def test_missing_onnxruntime_is_named(models, monkeypatch):
    from fiqa.models.export import MissingExtraError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r"onnxruntime.*fiqa-pseudolabel\[onnx\]"):
        open_predictor(models["onnx"])


def test_fiqa_predict_cli(models, inputs, tmp_path):
    """The installed command: a table for a few images, a CSV for all of them."""
    out = tmp_path / "scores.csv"
    proc = subprocess.run(
        [*fiqa_cmd(), "predict", models["onnx"], inputs["faces"], "-o", str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "score" in proc.stdout and "_image" in proc.stdout and "f3.png" in proc.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    ok = [r for r in rows if not r["reason"]]
    assert len(ok) == 4 and all(1.1 < float(r["score"]) < 4.6 for r in ok)


def test_predict_module_stays_light():
    """`fiqa predict model.onnx` never needs torch; building the CLI's parser imports nothing heavy."""
    code = (
        "import sys, fiqa.cli, fiqa.models.predictor, fiqa.predict; "
        "fiqa.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'onnxruntime', 'timm', 'ray') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
