"""encoders.transforms against open_clip's own inference preprocessing, bit for bit."""

import functools
import pickle

import numpy as np
import open_clip
import pytest
import skimage.data
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image

from encoders import OpenCLIPEncoder, encoder_transform, image_transform

# (open_clip model name, pretrained tag whose preprocessing open_clip would use with those weights)
MODELS = [("ViT-B-32", "openai"), ("ViT-B-16-SigLIP", "webli"), ("ViT-SO400M-14-SigLIP-384", "webli")]


@functools.cache
def photographs() -> dict[str, Image.Image]:
    return {name: Image.fromarray(getattr(skimage.data, name)()) for name in ("astronaut", "chelsea", "coffee")}


@functools.cache
def other_modes() -> dict[str, Image.Image]:
    """Non-RGB and awkward images, built with Pillow from the photographs (cached: never mutated)."""
    photos = photographs()
    chelsea, coffee, astronaut = photos["chelsea"], photos["coffee"], photos["astronaut"]
    rgba = coffee.copy()
    ramp = np.tile(np.linspace(0, 255, coffee.width).astype(np.uint8), (coffee.height, 1))
    rgba.putalpha(Image.fromarray(ramp))  # alpha varies, so how alpha is handled matters
    return {
        "grayscale": chelsea.convert("L"),
        "rgba": rgba,
        "palette": astronaut.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "very_wide": coffee.resize((1200, 45), Image.Resampling.BILINEAR),
        "very_tall": chelsea.resize((37, 700), Image.Resampling.BILINEAR),
        "tiny": chelsea.resize((21, 13), Image.Resampling.BILINEAR),
    }


def crop_offset_probes(size: int) -> dict[str, Image.Image]:
    """Images whose centre crop has a half-pixel margin (3 and 7 pixels): rounding must match."""
    chelsea = photographs()["chelsea"]
    return {
        "margin_3_rows": chelsea.resize((size, size + 3), Image.Resampling.BILINEAR),
        "margin_7_columns": chelsea.resize((size + 7, size), Image.Resampling.BILINEAR),
    }


def open_clip_eval_transform(model_name: str, tag: str, image_size: int):
    """What open_clip.create_model_and_transforms(model_name, pretrained=tag) returns for eval."""
    cfg = merge_preprocess_dict(PreprocessCfg(size=image_size), open_clip.get_pretrained_cfg(model_name, tag))
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def model_pair(request):
    model_name, tag = request.param
    with torch.device("meta"):  # only the preprocessing attributes are needed; no memory, no download
        encoder = OpenCLIPEncoder(model_name)
    return encoder, open_clip_eval_transform(model_name, tag, encoder.image_size)


def test_photographs_equal_open_clip(model_pair):
    encoder, reference = model_pair
    transform = encoder_transform(encoder)
    for name, image in {**photographs(), **crop_offset_probes(encoder.image_size)}.items():
        ours = transform(image)
        assert ours.shape == (3, encoder.image_size, encoder.image_size) and ours.dtype == torch.float32
        assert torch.equal(ours, reference(image)), name


def test_other_modes_equal_open_clip_on_rgb(model_pair):
    """We convert to RGB first (as LLaVA / HF do); open_clip's pipeline then gives the same tensor.

    For grayscale the order does not matter, so it also equals open_clip on the raw image.
    """
    encoder, reference = model_pair
    transform = encoder_transform(encoder)
    for name, image in other_modes().items():
        ours = transform(image)
        assert ours.shape == (3, encoder.image_size, encoder.image_size), name
        assert torch.equal(ours, reference(image.convert("RGB"))), name
    grayscale = other_modes()["grayscale"]
    assert torch.equal(transform(grayscale), reference(grayscale))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_every_resize_mode_and_interpolation(resize_mode, interpolation):
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    ours = image_transform(64, mean, std, resize_mode=resize_mode, interpolation=interpolation, fill_color=40)
    reference = open_clip.image_transform(
        64, is_train=False, mean=mean, std=std, resize_mode=resize_mode, interpolation=interpolation, fill_color=40
    )
    images = {**photographs(), **other_modes(), **crop_offset_probes(64)}
    for name, image in images.items():
        assert torch.equal(ours(image), reference(image.convert("RGB"))), (name, image.size)


def expand_by_hand(image: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    """LLaVA's expand2square written out pixel by pixel with numpy."""
    pixels = np.asarray(image.convert("RGB"))
    height, width, _ = pixels.shape
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:, :] = [int(m * 255) for m in mean]
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = pixels
    return Image.fromarray(canvas)


def test_pad_to_square_matches_hand_built_canvas(model_pair):
    encoder, reference = model_pair
    padded = encoder_transform(encoder, pad_to_square=True)
    plain = encoder_transform(encoder)
    photos = photographs()
    images = {
        "landscape": photos["chelsea"],
        "portrait": photos["coffee"].transpose(Image.Transpose.ROTATE_90),
        "odd_margin": photos["coffee"].crop((0, 0, 451, 300)),  # 151 pixels of padding: 75 top, 76 bottom
        "palette": other_modes()["palette"].crop((0, 0, 500, 201)),
    }
    for name, image in images.items():
        expected = reference(expand_by_hand(image, encoder.mean))
        ours = padded(image)
        assert torch.equal(ours, expected), name
        assert not torch.equal(ours, plain(image)), name  # padding really happened

    square = photos["astronaut"]
    assert torch.equal(padded(square), plain(square))


def test_pad_colour_normalizes_to_about_zero():
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transform = image_transform(32, mean, std, resize_mode="squash", pad_to_square=True)
    strip = Image.new("RGB", (32, 2), (255, 255, 255))
    out = transform(strip)
    corner = out[:, 0, 0]
    # int(m * 255) truncates, so the padding sits just below the mean: within one grey level of 0.
    assert torch.all(corner <= 0) and torch.all(corner > -1 / (255 * torch.tensor(std)))


def test_deterministic_and_picklable():
    image = photographs()["chelsea"]
    transform = image_transform(48, 0.5, 0.5, resize_mode="squash", pad_to_square=True)
    clone = pickle.loads(pickle.dumps(transform))  # DataLoader workers receive it pickled
    assert torch.equal(transform(image), transform(image))
    assert torch.equal(clone(image), transform(image))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resize_mode"):
        image_transform(32, 0.5, 0.5, resize_mode="crop")
    with pytest.raises(ValueError, match="interpolation"):
        image_transform(32, 0.5, 0.5, interpolation="nearest")
    with pytest.raises(ValueError, match="mean"):
        image_transform(32, (0.5, 0.5), 0.5)
    with pytest.raises(TypeError, match="PIL"):
        image_transform(32, 0.5, 0.5)(np.zeros((4, 4, 3), dtype=np.uint8))
