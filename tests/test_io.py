import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.io import (RadioMapError, check_map, decode_npy, decode_png, encode_npy, encode_png,
                      from_model, read_png, to_model, write_png)


def _ramp(h=32, w=48):
    return np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)


def test_png_8bit_round_trip_matches_radiomapseer_scaling(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels, mode="L").save(tmp_path / "1_0.png")
    x = read_png(tmp_path / "1_0.png")
    assert x.dtype == np.float32 and np.allclose(x, pixels / 255.0)
    assert np.array_equal(decode_png(encode_png(x, bits=8)), x)


def test_png_16bit_round_trip_is_finer_than_8bit(tmp_path):
    x = _ramp()
    write_png(tmp_path / "m.png", x, bits=16)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode.startswith("I;16")
    y = read_png(tmp_path / "m.png")
    assert np.abs(y - x).max() <= 0.5 / 65535 + 1e-7
    assert np.abs(decode_png(encode_png(x, bits=8)) - x).max() > 1e-3


def test_png_limits_and_bad_inputs():
    x = encode_png(_ramp(64, 64))
    with pytest.raises(RadioMapError, match="64x64 = 4096 pixels; the limit is 1000"):
        decode_png(x, max_pixels=1000)
    with pytest.raises(RadioMapError, match="limit is 10"):
        decode_png(x, max_bytes=10)
    with pytest.raises(RadioMapError, match="not a decodable PNG"):
        decode_png(x[: len(x) // 2])
    with pytest.raises(RadioMapError, match="not a decodable PNG"):
        decode_png(b"GIF89a" + b"\0" * 100)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with pytest.raises(RadioMapError, match="grayscale PNG, got mode 'RGB'"):
        decode_png(buf.getvalue())


def test_missing_png_names_the_file(tmp_path):
    with pytest.raises(RadioMapError, match=r"nothere\.png: cannot read"):
        read_png(tmp_path / "nothere.png")


def test_value_checks():
    with pytest.raises(RadioMapError, match="NaN or Inf"):
        check_map(np.array([[np.nan]], dtype=np.float32))
    with pytest.raises(RadioMapError, match=r"in \[0, 1\]"):
        check_map(np.array([[2.0]], dtype=np.float32))
    with pytest.raises(RadioMapError, match="float map"):
        check_map(np.array([[1]], dtype=np.int64))
    assert check_map(np.array([[1.0005]], dtype=np.float32)).max() == 1.0


def test_npy_round_trip_and_no_pickles():
    x = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)
    assert np.array_equal(decode_npy(encode_npy(x)), x)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RadioMapError, match="not a readable .npy"):
        decode_npy(buf.getvalue())
    with pytest.raises(RadioMapError, match="limit"):
        decode_npy(encode_npy(x), max_bytes=16)


def test_model_scaling_is_the_seed_normalisation():
    x = _ramp()
    t = to_model(x)
    assert t.min() == -1 and t.max() == 1
    assert torch.allclose(from_model(t), torch.from_numpy(x))
    assert from_model(torch.tensor([3.0, -3.0])).tolist() == [1.0, 0.0]
