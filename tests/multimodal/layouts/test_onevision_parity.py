"""Our anyres layout against transformers' LLaVA-OneVision, end to end: a tiny model (OneVision's
384 px / patch 14 geometry) is exported with export_hf_llava_onevision; AutoProcessor and
LlavaOnevisionForConditionalGeneration load the directory with no extra code and give our prompt ids,
our pixels and our logits, for one image of many sizes (small, square, wide, tall, one large enough
for the bilinear reduction, and seeded random sizes), two images in one turn, and a video; greedy
decoding gives our tokens."""

import json
import random

import numpy as np
import pytest
import skimage.data
import torch
import transformers
from PIL import Image

from multimodal import VisionLanguageModel
from multimodal.batch import Batch
from multimodal.cli import main
from multimodal.export_onevision import export_hf_llava_onevision
from multimodal.layouts import onevision_pinpoints
from multimodal.layouts.geometry import feature_grid, tile_grid
from tests.multimodal.layouts.tiny_onevision import build_tiny_onevision_vlm
from tests.numerics import assert_close_scaled

QUESTION = "What is in the image?"
LOGITS_REL = 1e-4  # fp32, relative to the logits' largest entry (the issue's bar)
SIZES = [(150, 200), (384, 384), (300, 1000), (1000, 300), (480, 640), (1080, 1920)]


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """(our model, HF model, HF processor with the Pillow image processor)."""
    model = build_tiny_onevision_vlm(tokenizer).eval()
    with torch.no_grad():  # a newline far from zero, so that a misplaced one shows in the logits
        model.image_newline.mul_(20)
    out = export_hf_llava_onevision(model, tmp_path_factory.mktemp("hf-onevision") / "ov")
    hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    # The Pillow image processor (what ours matches bit for bit); the video processor is
    # torchvision's in every backend, and ours follows it.
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    return model, hf, processor


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photograph cropped from skimage's astronaut or coffee, resized to (height, width)."""
    source = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()][seed % 3]
    return Image.fromarray(source).resize((size[1], size[0]), Image.Resampling.BILINEAR)


def hf_inputs(processor, images=(), videos=()):
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    options = {"images": [list(images)] if images else None}
    if videos:
        options["videos"] = [[np.asarray(frame) for frame in video] for video in videos]
    return processor(text=text, return_tensors="pt", **options)


def our_inputs(model, images=(), videos=()):
    markers = "<image>\n" * len(images) + "<video>\n" * len(videos)
    messages = [{"role": "user", "content": markers + QUESTION}]
    return model._prompt_ids(messages, list(images), list(videos)), model.preprocess(list(images), list(videos))


def compare(model, hf, processor, images=(), videos=()):
    inputs = hf_inputs(processor, images, videos)
    ids, pixels = our_inputs(model, images, videos)
    assert inputs["input_ids"][0].tolist() == ids
    if images:
        views = inputs["pixel_values"][0][:pixels.pixels.shape[0]] if len(images) == 1 else inputs["pixel_values"][:, 0]
        assert torch.equal(views, pixels.pixels)
        assert inputs["image_sizes"].tolist() == [list(size) for size in pixels.sizes]
    if videos:
        assert torch.equal(inputs["pixel_values_videos"].flatten(0, 1), pixels.frames)
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(Batch(input_ids=torch.tensor([ids]), pixels=pixels), return_logits=True)[1]
    assert theirs.shape == ours.shape
    assert_close_scaled(theirs, ours, rel=LOGITS_REL)
    return ours


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_one_image_gives_our_ids_pixels_and_logits(exported, size):
    model, hf, processor = exported
    compare(model, hf, processor, images=[photo(size)])


def test_the_large_image_is_reduced_and_the_small_ones_are_not():
    pinpoints = onevision_pinpoints(384)
    reduced = [feature_grid(s, tile_grid(s, pinpoints, 384), 27, 9).reduced for s in SIZES]
    assert reduced == [False] * 5 + [True]


def test_random_sizes_give_our_logits(exported):
    model, hf, processor = exported
    rng = random.Random(13)
    for seed in range(3):
        size = (rng.randint(40, 1400), rng.randint(40, 1400))
        compare(model, hf, processor, images=[photo(size, seed)])


def test_two_images_in_one_turn(exported):
    model, hf, processor = exported
    compare(model, hf, processor, images=[photo((300, 500), 0), photo((640, 480), 1)])


def test_a_video(exported):
    model, hf, processor = exported
    frames = [photo((240, 320), seed) for seed in range(4)]
    compare(model, hf, processor, videos=[frames])


def test_the_image_matters(exported):
    """The comparison covers the vision path: another image moves the logits far beyond the tolerance."""
    model, hf, processor = exported
    a = compare(model, hf, processor, images=[photo((480, 640), 0)])
    b = compare(model, hf, processor, images=[photo((480, 640), 1)])
    assert (a - b).abs().max() > 100 * LOGITS_REL * a.abs().max()


def test_greedy_generation_gives_our_tokens(exported):
    model, hf, processor = exported
    image = photo((300, 1000), 2)
    inputs = hf_inputs(processor, [image])
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    stop = {model.tokenizer.im_end_id, model.tokenizer.eos_id}
    if theirs and theirs[-1] in stop:  # HF returns the stop token, ours does not
        theirs = theirs[:-1]
    ids, pixels = our_inputs(model, [image])
    assert model.generate([ids], pixels, max_new_tokens=8)[0] == theirs
    assert model.caption(image, prompt=QUESTION, max_new_tokens=8) == processor.decode(theirs, skip_special_tokens=True)


def test_export_then_import_is_bit_identical(exported, tmp_path):
    model = exported[0]
    out = export_hf_llava_onevision(model, tmp_path / "hf")
    assert main(["import", "--from", "hf-llava-onevision", str(out), str(tmp_path / "back")]) == 0
    back = VisionLanguageModel.from_pretrained(tmp_path / "back")
    assert back.layout == model.layout and back.video_token_id == model.video_token_id
    assert back.encoder.config()["activation"] == "gelu_tanh"
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    image = photo((500, 700), 1)
    ids, pixels = our_inputs(model, [image])
    assert back.generate([ids], back.preprocess([image]), max_new_tokens=6) == model.generate([ids], pixels, max_new_tokens=6)


def test_cli_exports_and_describes_an_anyres_checkpoint(exported, tmp_path, capsys):
    model = exported[0]
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["info", str(tmp_path / "ckpt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "anyres" and info["tokens_per_image_480x640"] == 2929
    assert info["tokens_per_image_among_several"] == 730 and info["tokens_per_video_frame"] == 196
    assert main(["export", "--to", "hf-llava-onevision", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava_onevision"
    # The fixed-layout LLaVA format cannot hold it, and says so.
    assert main(["export", "--to", "hf-llava", str(tmp_path / "ckpt"), str(tmp_path / "llava")]) == 2


def test_a_fixed_layout_model_is_refused_by_the_onevision_export(vlm, tmp_path):
    with pytest.raises(ValueError, match="--to hf-llava"):
        export_hf_llava_onevision(vlm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
