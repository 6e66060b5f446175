"""Safe weight loading: a safetensors file whose header length starts with byte 0x80 (as a
pickle does) is still safetensors; real pickles and zips are refused."""
from __future__ import annotations

import struct

import pytest
import torch

from exitnas.errors import CheckpointError
from exitnas.io import load_weights, save_weights
from exitnas.runtime import read_safetensors_header


def _with_header_length_0x80(tmp_path):
    """Grow the metadata until the 8-byte header length's first byte is 0x80."""
    for pad in range(0, 600):
        path = tmp_path / f"w{pad}.safetensors"
        save_weights(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            return path
    raise AssertionError("no padding gave a 0x80 first byte")


def test_safetensors_starting_with_0x80_loads(tmp_path):
    path = _with_header_length_0x80(tmp_path)
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert torch.equal(load_weights(path)["w"], torch.arange(6.0).reshape(2, 3))
    assert read_safetensors_header(path)["w"] == ("F32", (2, 3))


@pytest.mark.parametrize("kind", ["torch_save", "pickle"])
def test_pickles_are_refused(tmp_path, kind):
    import pickle

    path = tmp_path / "w.safetensors"
    if kind == "torch_save":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": [0.0, 0.0]}))
    with pytest.raises(CheckpointError, match="not safetensors; refusing"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="not safetensors; refusing"):
        read_safetensors_header(path)
