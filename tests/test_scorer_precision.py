"""The scoring actor's precision and compilation: the scores of the eager fp32 model within
1e-2 on the MOS scale (the raw scores' range mapped onto 1-5), on faces.

The numerics need a GPU (a CPU always scores in fp32) and run where CUDA is; the padding
that gives a compiled model one batch shape runs everywhere.
"""

import numpy as np
import pytest
import torch
from test_device_decode import faces

from fiqa.data.decode import decode_image
from fiqa.models import create_model, save_checkpoint
from fiqa.scoring.scorer import Scorer

TOLERANCE = 1e-2
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def checkpoint(tmp_path, arch: str, size: int) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / arch)
    save_checkpoint(
        path,
        create_model(arch, size).eval(),
        {"arch": arch, "image_size": size, "resize": size + size // 8},
    )
    return path


def pixels(n: int, size: int) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([decode_image(d, size + size // 8, crop=size) for d in faces(n)])
    )


def mos_error(scores: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(scores - reference).max() * 4 / np.ptp(reference))


def test_a_cpu_scores_in_fp32_whatever_the_precision(tmp_path):
    ck = checkpoint(tmp_path, "resnet10t", 64)
    x = pixels(8, 64)
    want = Scorer(ck, precision="32-true", device="cpu").score(x)
    for precision in ("16-mixed", "bf16-true"):
        scorer = Scorer(ck, precision=precision, device="cpu")
        assert scorer.precision == "32-true" and scorer.autocast is None
        np.testing.assert_allclose(scorer.score(x), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="precision"):
        Scorer(ck, precision="fp8", device="cpu")


def test_a_short_batch_is_padded_to_the_compiled_shape(tmp_path):
    ck = checkpoint(tmp_path, "resnet10t", 64)
    x = pixels(5, 64)
    want = Scorer(ck, device="cpu").score(x)
    padded = Scorer(ck, device="cpu")  # the CPU path, on a GPU machine too
    padded.pad_to = 8  # what compile=True sets, without compiling (the shapes are the point)
    calls = []
    padded.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    got = padded.score(x)
    assert calls == [8] and got.shape == (5,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@cuda
@pytest.mark.parametrize(
    "arch,size", [("swin_tiny_patch4_window7_224", 224), ("edgenext_xx_small", 256)]
)
def test_half_precision_scores_like_fp32(tmp_path, arch, size):
    ck = checkpoint(tmp_path, arch, size)
    x = pixels(64, size).cuda()
    reference = Scorer(ck, precision="32-true").score(x)
    errors = {p: mos_error(Scorer(ck, precision=p).score(x), reference) for p in ("16-mixed",)}
    compiled = Scorer(ck, precision="16-mixed", compile=True, batch_size=64)
    errors["compiled 16-mixed"] = mos_error(compiled.score(x), reference)
    print(arch, errors)  # the others' errors, for the record: bf16 rounds 8x coarser
    for p in ("bf16-mixed", "16-true", "bf16-true"):
        print(arch, p, mos_error(Scorer(ck, precision=p).score(x), reference))
    assert max(errors.values()) <= TOLERANCE, errors
