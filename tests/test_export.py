"""`fiqa export`: ONNX and TorchScript exports match the PyTorch model and carry their contract.

Parity is measured against the checkpoint loaded the ordinary way
(`load_checkpoint`, `to_model_input`, `Logistic4` in numpy), not against the
export wrapper, and the exports are run with ONNX Runtime and `torch.jit.load`
directly, not through `fiqa.models.predictor`.
"""

import hashlib
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from fiqa.calibration import Logistic4
from fiqa.models import create_model, export_checkpoint, load_checkpoint, save_checkpoint
from fiqa.models.export import MissingExtraError
from fiqa.models.inputs import to_model_input

SIZE = 32
CALIB = Logistic4(4.8, 1.2, 0.05, 0.3)


def make_checkpoint(path, arch="resnet10t", size=SIZE, calibration=CALIB, seed=0):
    torch.manual_seed(seed)
    model = create_model(arch, size).eval()
    meta = {"arch": arch, "image_size": size, "resize": size + 8, "config_fingerprint": "abc123"}
    meta["calibration"] = calibration.to_dict() if calibration else None
    save_checkpoint(str(path), model, meta)
    return str(path)


def reference(checkpoint, pixels: np.ndarray):
    """raw and calibrated scores the way the pipeline computes them."""
    loaded = load_checkpoint(checkpoint)
    with torch.inference_mode():
        raw = loaded.model(to_model_input(torch.from_numpy(pixels))).double().numpy()
    calib = loaded.calibration
    return raw, (calib(raw) if calib else raw)


def pixels(n, size=SIZE, seed=3):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "model")


def test_onnx_export_matches_pytorch_and_carries_its_contract(checkpoint, tmp_path):
    import onnx
    import onnxruntime as ort

    out = str(tmp_path / "m.onnx")
    meta = export_checkpoint(checkpoint, "onnx", out, batch=2)
    assert meta["exporter"] == "torch.onnx dynamo"

    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "pixels" and inp.type == "tensor(uint8)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [SIZE, SIZE, 3]  # dynamic batch
    assert [o.name for o in session.get_outputs()] == ["raw_score", "score"]
    for n in (1, 7):  # batch sizes other than the traced one
        x = pixels(n, seed=n)
        raw, score = session.run(None, {"pixels": x})
        ref_raw, ref_score = reference(checkpoint, x)
        assert raw.shape == score.shape == (n,)
        assert np.max(np.abs(raw - ref_raw)) < 1e-4
        assert np.max(np.abs(score - ref_score)) < 1e-4
    assert np.ptp(ref_score) > 1e-3  # the calibration is exercised, not a constant

    embedded = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["fiqa"])
    sidecar = json.loads(open(out + ".json").read())
    for m in (embedded, sidecar):
        assert m["image_size"] == SIZE and m["resize"] == SIZE + 8 and m["arch"] == "resnet10t"
        assert Logistic4.from_dict(m["calibration"]) == CALIB
        assert m["input"]["dtype"] == "uint8" and m["input"]["layout"] == "NHWC"
    digest = hashlib.sha256(open(f"{checkpoint}/model.safetensors", "rb").read()).hexdigest()
    assert sidecar["source"]["weights_sha256"] == digest
    assert sidecar["source"]["config_fingerprint"] == "abc123"
    assert sidecar["parity"]["max_abs_diff_raw"] < 1e-4
    assert sidecar["parity"]["max_abs_diff_score"] < 1e-4


def test_onnx_opset_below_18_uses_the_legacy_exporter(checkpoint, tmp_path):
    """torch's dynamo exporter writes opset 18+; an older opset is asked of the legacy one."""
    import onnx

    out = str(tmp_path / "m.onnx")
    meta = export_checkpoint(checkpoint, "onnx", out, opset=17)
    assert meta["opset"] == 17 and "legacy" in meta["exporter"]
    assert [o.version for o in onnx.load(out).opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert meta["parity"]["max_abs_diff_score"] < 1e-4


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path):
    out = str(tmp_path / "m.pt")
    export_checkpoint(checkpoint, "torchscript", out, batch=3)
    extra = {"fiqa.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(out, map_location="cpu", _extra_files=extra)
    assert json.loads(extra["fiqa.json"])["calibration"] == CALIB.to_dict()
    x = pixels(5)
    with torch.inference_mode():
        raw, score = (t.double().numpy() for t in module(torch.from_numpy(x)))
    ref_raw, ref_score = reference(checkpoint, x)
    assert np.max(np.abs(raw - ref_raw)) < 1e-4
    assert np.max(np.abs(score - ref_score)) < 1e-4


def test_without_calibration_score_is_the_raw_output(tmp_path):
    ck = make_checkpoint(tmp_path / "ck", calibration=None)
    meta = export_checkpoint(ck, "torchscript", str(tmp_path / "m.pt"))
    assert meta["calibration"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(tmp_path / "m.pt"))
    raw, score = module(torch.from_numpy(pixels(4)))
    assert torch.equal(raw, score)


def test_a_failed_parity_check_removes_the_export(checkpoint, tmp_path):
    out = tmp_path / "m.pt"
    with pytest.raises(ValueError, match="does not match the PyTorch model"):
        export_checkpoint(checkpoint, "torchscript", str(out), tolerance=-1.0)
    assert not out.exists() and not (tmp_path / "m.pt.json").exists()


def test_missing_onnx_extra_is_named(checkpoint, tmp_path, monkeypatch, capsys):
    from fiqa.cli import main

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r"onnxscript.*fiqa-pseudolabel\[onnx\]"):
        export_checkpoint(checkpoint, "onnx", str(tmp_path / "m.onnx"))
    assert main(["export", checkpoint, "--format", "onnx", "-o", str(tmp_path / "x")]) == 2
    assert "pip install 'fiqa-pseudolabel[onnx]'" in capsys.readouterr().err


def test_export_command(checkpoint, tmp_path, capsys):
    from fiqa.cli import main

    out = str(tmp_path / "sub" / "m.pt")
    assert main(["export", checkpoint, "--format", "torchscript", "-o", out]) == 0
    text = capsys.readouterr().out
    assert "uint8 [batch, 32, 32, 3]" in text and "parity with PyTorch" in text
    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx", "-o", out]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,size",
    [
        ("mobilenetv3_small_100", 64),
        ("edgenext_xx_small", 64),
        ("swin_tiny_patch4_window7_224", 64),
    ],
)
def test_onnx_export_of_other_backbones(arch, size, tmp_path):
    """The demo's student, the paper's student and a Swin (the paper's teacher family)."""
    import onnxruntime as ort

    ck = make_checkpoint(tmp_path / "ck", arch=arch, size=size)
    out = str(tmp_path / "m.onnx")
    meta = export_checkpoint(ck, "onnx", out)
    assert meta["exporter"] == "torch.onnx dynamo"
    x = pixels(3, size)
    raw, score = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(
        None, {"pixels": x}
    )
    ref_raw, ref_score = reference(ck, x)
    assert np.max(np.abs(raw - ref_raw)) < 1e-4
    assert np.max(np.abs(score - ref_score)) < 1e-4
