import io

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal.data.decode import SkipSample, decode_image, decode_json, decode_text
from tests.multimodal.data.helpers import model_parts


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pixel(image: Image.Image, xy=(0, 0)):
    return tuple(int(v) for v in np.asarray(image)[xy[1], xy[0]])


def test_palette_with_transparency_composites_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    decoded = decode_image(encode(image, transparency=0))
    assert decoded.mode == "RGB"
    assert pixel(decoded, (0, 0)) == (255, 255, 255)  # the transparent (black) index shows white
    assert pixel(decoded, (6, 0)) == (200, 10, 20)


def test_gray_alpha_composites_on_white():
    data = np.zeros((4, 4, 2), np.uint8)
    data[:, :2] = (50, 0)      # fully transparent
    data[:, 2:] = (50, 255)    # opaque dark gray
    decoded = decode_image(encode(Image.fromarray(data, "LA")))
    assert decoded.mode == "RGB"
    assert pixel(decoded, (0, 0)) == (255, 255, 255) and pixel(decoded, (3, 0)) == (50, 50, 50)


def test_rgba_half_alpha_blends_with_white():
    decoded = decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128))))
    assert all(abs(v - 127) <= 1 for v in pixel(decoded))


def test_grayscale_and_cmyk():
    assert pixel(decode_image(encode(Image.new("L", (4, 4), 77)))) == (77, 77, 77)
    assert pixel(decode_image(encode(Image.new("1", (4, 4), 1)))) == (255, 255, 255)
    cmyk = decode_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF"))
    assert cmyk.mode == "RGB" and pixel(cmyk) == (255, 0, 0)
    jpeg = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert jpeg.mode == "RGB" and np.abs(np.asarray(jpeg, int) - [255, 0, 0]).max() <= 8


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    data = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
    raw = encode(Image.fromarray(data))
    assert Image.open(io.BytesIO(raw)).mode == "I;16"
    decoded = decode_image(raw)
    assert decoded.mode == "RGB"
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 100, 128, 255]


@pytest.mark.parametrize("mode", ["P", "LA", "L", "CMYK", "I;16", "RGBA", "RGB"])
def test_every_mode_becomes_an_encoder_tensor(tokenizer, mode):
    transform = model_parts(tokenizer).transform
    base = Image.new("RGB", (40, 32), (10, 200, 30))
    image = base.convert("I;16") if mode == "I;16" else base.convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    tensor = transform(decode_image(encode(image, fmt)))
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and torch.isfinite(tensor).all()


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_undecodable_images_raise_skip(data):
    if data is None:  # a real PNG cut in half
        data = encode(Image.new("RGB", (32, 32), (1, 2, 3)))[:60]
    with pytest.raises(SkipSample) as info:
        decode_image(data)
    assert info.value.reason == "image_undecodable"


def test_decompression_bomb_is_its_own_reason(monkeypatch):
    raw = encode(Image.new("L", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2x the limit
    with pytest.raises(SkipSample) as info:
        decode_image(raw)
    assert info.value.reason == "image_too_large"


def test_text_and_json():
    assert decode_text(" Un gat.\n".encode()) == "Un gat."
    for data, reason in [(b"\xff\xfeabc", "not_utf8"), (b" \n", "empty_text")]:
        with pytest.raises(SkipSample) as info:
            decode_text(data)
        assert info.value.reason == reason
    assert decode_json(b'{"language": "ca"}') == {"language": "ca"}
    for data, reason in [(b"{nope", "invalid_json"), (b"[1, 2]", "invalid_json"), (b'"\xff"', "not_utf8")]:
        with pytest.raises(SkipSample) as info:
            decode_json(data)
        assert info.value.reason == reason
