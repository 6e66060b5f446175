"""The export's input view: the runtime turns an image file into exactly the evaluation input
the data pipeline scored (square resize in memory; shorter side + centre crop when streamed),
with Pillow only, and arch.json's ``input.view`` is checked by allowlist."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from exitnas.runtime import ExportError, _apply_view, check_view, read_image
from exitnas.stream import FolderSet


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), size=st.integers(4, 96),
       seed=st.integers(0, 2**16))
def test_shorter_side_view_is_torchvisions_resize_and_centre_crop(w, h, size, seed):
    from torchvision import transforms as T

    im = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    shorter = round(size / 0.875)
    want = T.Compose([T.Resize(shorter), T.CenterCrop(size)])(im)
    got = _apply_view(im, size, {"resize": "shorter_side", "shorter": shorter, "crop": size})
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_runtime_reads_files_as_the_streamed_evaluation_batches(tmp_path):
    """Files of several shapes and formats: the runtime's read_image with the set's view,
    scaled to [0, 1], equals FolderSet's evaluation batches bit for bit."""
    rng = np.random.default_rng(1)
    names = []
    for i, (w, h, fmt) in enumerate([(40, 30, "png"), (33, 61, "jpeg"), (64, 64, "png"),
                                     (90, 45, "bmp"), (25, 25, "jpeg")]):
        (tmp_path / "c").mkdir(exist_ok=True)
        name = f"c/{i}.{fmt}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        names.append(name)
    images = FolderSet.of(tmp_path, names, [0] * len(names), channels=3, size=32)
    (x, _), = images.batches(batch_size=len(names), mean=(0.0,) * 3, std=(1.0,) * 3)
    read = np.stack([read_image(tmp_path / n, 3, 32, images.view) for n in names])
    assert np.array_equal(read.astype(np.float32) / 255, x.numpy())


@pytest.mark.parametrize("view", [
    {"resize": "shorter_side", "shorter": 36, "crop": 31},        # crop is not the input size
    {"resize": "shorter_side", "shorter": 20, "crop": 32},        # would pad
    {"resize": "shorter_side", "shorter": 10**9, "crop": 32},     # a huge resize
    {"resize": "shorter_side", "shorter": 36.5, "crop": 32},
    {"resize": "shorter_side", "shorter": 36, "crop": 32, "code": "import os"},
    {"resize": "lanczos"}, "square", None, [],
])
def test_unknown_views_are_refused(view):
    with pytest.raises(ExportError, match="input.view"):
        check_view(view, 32)


def test_square_is_the_default_view():
    assert check_view({"resize": "square"}, 32) == {"resize": "square"}
    im = Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8))
    assert _apply_view(im, 8, {"resize": "square"}).size == (8, 8)
