import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fiqa.calibration import Logistic4
from fiqa.models import (
    REGISTRY,
    create_model,
    load_checkpoint,
    model_cost,
    resolve_spec,
    save_checkpoint,
)
from fiqa.models.checkpoint import load_pretrained_backbone


def test_registry_has_the_papers_models():
    assert REGISTRY["swin_base"].image_size == 448
    assert REGISTRY["edgenext_xx_small"].image_size == 352
    assert resolve_spec("resnet10t").arch == "resnet10t"  # any timm name
    with pytest.raises(ValueError, match="unknown model"):
        resolve_spec("no_such_net")


@pytest.mark.parametrize(
    "name,size", [("resnet18", 64), ("mobilenetv3_small_100", 64), ("edgenext_xx_small", 64)]
)
def test_models_regress_one_score_per_image(name, size):
    m = create_model(name, size).eval()
    with torch.no_grad():
        out = m(torch.zeros(3, 3, size, size))
    assert out.shape == (3,)


def test_papers_student_cost_is_as_published():
    cost = model_cost(create_model("edgenext_xx_small"), 352)
    assert 1.0 < cost["params_m"] < 1.5  # paper: about 1.2 M
    assert 0.2 < cost["gflops"] < 0.6  # paper: about 0.33 GFLOPs (MACs) at 352 px


def test_checkpoint_round_trip_keeps_weights_and_calibration(tmp_path):
    m = create_model("resnet18", 48).eval()
    calib = Logistic4(5, 1, 0.2, 0.5)
    save_checkpoint(
        str(tmp_path / "ck"),
        m,
        {"arch": "resnet18", "image_size": 48, "resize": 56, "calibration": calib.to_dict()},
    )
    loaded = load_checkpoint(str(tmp_path / "ck"))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.model(x).numpy(), m(x).numpy(), atol=1e-6)
    assert loaded.calibration == calib and loaded.resize == 56


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "nothing"))


def test_pretrained_backbone_from_safetensors(tmp_path):
    src = create_model("resnet18", 48)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(path))
    dst = create_model("resnet18", 48)
    load_pretrained_backbone(dst, str(path))
    assert torch.equal(dst.backbone.conv1.weight, src.backbone.conv1.weight)
    other = tmp_path / "other.safetensors"
    save_file({"unrelated": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="none of its tensors"):
        load_pretrained_backbone(dst, str(other))


def test_models_command_lists_the_registry(capsys):
    from fiqa.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY)
