"""multimodal.layouts.views against transformers' LLaVA-OneVision processors, bit for bit: the Pillow
image processor (one image per sample: base view + tiles; several: one padded square view each) and
the video processor (torchvision), on photographs (skimage.data) and Pillow-drawn sharp edges."""

import pytest
import torch
from PIL import Image, ImageDraw
from skimage import data
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

from multimodal.layouts import FIXED, ImageLayout, onevision_pinpoints
from multimodal.layouts.geometry import tile_grid
from multimodal.layouts.views import anyres_views, sample_views, square_view, video_views

HALF = [0.5] * 3
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # the processors' class defaults (OpenAI CLIP)
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def photo(name: str, height: int | None = None, width: int | None = None) -> Image.Image:
    """A skimage photograph, resized (bicubic) to height x width when given."""
    image = Image.fromarray(getattr(data, name)())
    return image if height is None else image.resize((width, height), Image.Resampling.BICUBIC)


def drawn(height: int, width: int) -> Image.Image:
    """Sharp edges: a checkerboard, lines and filled shapes in saturated colours."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell = max(2, min(height, width) // 12)
    for top in range(0, height, cell):
        for left in range((top // cell) % 2 * cell, width, 2 * cell):
            draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=(0, 0, 0))
    draw.line([0, 0, width - 1, height - 1], fill=(255, 0, 0), width=3)
    draw.ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=(0, 200, 40), outline=(0, 0, 255))
    draw.text((5, 5), "OneVision 384", fill=(250, 250, 0))
    return image


def image_processor(tile: int = 384, mean=HALF, std=HALF) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(image_mean=mean, image_std=std, size={"height": tile, "width": tile},
                                           image_grid_pinpoints=onevision_pinpoints(tile))


@pytest.fixture(scope="module")
def hf384():
    return image_processor(384)


@pytest.fixture(scope="module")
def hf28():
    return image_processor(28)


def check_anyres(processor, image: Image.Image, tile: int, mean=HALF, std=HALF) -> torch.Tensor:
    """Our anyres views equal the processor's pixel_values (its real views), and the view count is
    the tile grid's plus the base view."""
    pins = onevision_pinpoints(tile)
    ours = anyres_views(image, pins, tile, mean, std)
    rows, cols = tile_grid((image.height, image.width), pins, tile)
    assert ours.shape == (rows * cols + 1, 3, tile, tile) and ours.dtype == torch.float32
    out = processor(images=[image], return_tensors="pt")
    assert out["pixel_values"].shape == (1, rows * cols + 1, 3, tile, tile)
    assert torch.equal(out["pixel_values"][0, : len(ours)], ours)
    assert out["image_sizes"].tolist() == [[image.height, image.width]]
    assert out["batch_num_images"].tolist() == [1]
    return ours


@pytest.mark.parametrize("name, height, width, views", [
    ("chelsea", 150, 200, 2),  # small: still base + one tile
    ("coffee", 384, 384, 2),
    ("astronaut", 300, 1000, 4),  # wide: 1x3
    ("rocket", 1000, 300, 4),  # tall: 3x1
    ("coffee", 480, 640, 5),  # 2x2
    ("astronaut", 1080, 1920, 16),  # 3x5
])
def test_photo_anyres_matches_hf(hf384, name, height, width, views):
    assert len(check_anyres(hf384, photo(name, height, width), 384)) == views


def test_cropped_photo_anyres_matches_hf(hf384):
    """A crop of odd size (uneven padding: the bottom/right margin gets the extra pixel)."""
    image = photo("rocket").crop((13, 7, 13 + 611, 7 + 257))
    check_anyres(hf384, image, 384)


def test_drawn_image_anyres_matches_hf(hf384):
    check_anyres(hf384, drawn(421, 613), 384)


def test_modes_anyres_match_hf(hf384):
    """Grey, palette and transparent images are made RGB as Hugging Face does (alpha onto white)."""
    base = drawn(200, 320)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    for image in (base.convert("L"), base.convert("P"), rgba, base.convert("LA")):
        check_anyres(hf384, image, 384)


@pytest.mark.parametrize("height, width",
                         [(10, 14), (28, 28), (21, 71), (71, 21), (34, 45), (77, 137), (200, 170), (1, 1)])
def test_tiny_tile_anyres_matches_hf(hf28, height, width):
    """Tile 28 with OneVision's 36 pinpoints scaled to it (the processor takes any square size)."""
    check_anyres(hf28, photo("astronaut", height, width), 28)
    check_anyres(hf28, drawn(height, width), 28)


def test_clip_normalisation_matches_hf():
    """Other mean/std (the processors' OpenAI-CLIP defaults): anyres views and the multi-image pad
    colour int(mean * 255) per channel."""
    processor = image_processor(384, CLIP_MEAN, CLIP_STD)
    check_anyres(processor, photo("coffee", 300, 500), 384, CLIP_MEAN, CLIP_STD)
    a, b = photo("chelsea", 200, 333), drawn(300, 120)
    out = processor(images=[[a, b]], return_tensors="pt")
    ours = torch.cat([square_view(a, 384, CLIP_MEAN, CLIP_STD), square_view(b, 384, CLIP_MEAN, CLIP_STD)])
    assert torch.equal(out["pixel_values"][:, 0], ours)


@pytest.mark.parametrize("tile", [384, 28])
def test_several_images_match_hf(hf384, hf28, tile):
    """Two and three images in one sample: one square view each (grey 127 margins, odd margins
    split with the smaller half first); sample_views picks that path."""
    processor = hf384 if tile == 384 else hf28
    layout = ImageLayout.anyres(tile=tile)
    samples = [[photo("astronaut", 300, 1000), photo("rocket", 1001, 300)],
               [drawn(201, 100), photo("coffee", 384, 384), photo("chelsea", 150, 200)]]
    for images in samples:
        out = processor(images=[images], return_tensors="pt")
        assert out["pixel_values"].shape == (len(images), 1, 3, tile, tile)
        assert out["batch_num_images"].tolist() == [len(images)]
        assert out["image_sizes"].tolist() == [[image.height, image.width] for image in images]
        ours = sample_views(images, layout, tile, 0.5, 0.5)
        assert [view.shape for view in ours] == [(1, 3, tile, tile)] * len(images)
        assert torch.equal(out["pixel_values"][:, 0], torch.cat(ours))
        assert torch.equal(torch.cat(ours), torch.cat([square_view(image, tile, HALF, HALF) for image in images]))


def test_square_view_background_is_127():
    view = square_view(Image.new("RGB", (10, 4), (255, 255, 255)), 10, HALF, HALF)
    # 10x4 centred on 10x10: rows 0-2 and 7-9 are grey 127, i.e. (127/255 - 0.5) / 0.5
    grey = (torch.tensor(127, dtype=torch.float64) / 255).float().sub(0.5).div(0.5)
    assert torch.equal(view[0, :, :3], grey.expand(3, 3, 10)) and torch.equal(view[0, :, 7:], grey.expand(3, 3, 10))
    assert torch.equal(view[0, :, 3:7], torch.ones(3, 4, 10))


def test_sample_views_one_image_is_anyres(hf384):
    image = photo("coffee", 480, 640)
    (views,) = sample_views([image], ImageLayout.anyres(), 384, HALF, HALF)
    assert torch.equal(views, check_anyres(hf384, image, 384))
    assert sample_views([], ImageLayout.anyres(), 384, HALF, HALF) == []


def frames(height: int = 240, width: int = 320) -> list[Image.Image]:
    return [photo(name, height, width) for name in ("astronaut", "coffee", "chelsea")] + [drawn(height, width)]


@pytest.fixture(scope="module")
def hf_video():
    return LlavaOnevisionVideoProcessor(image_mean=HALF, image_std=HALF, size={"height": 384, "width": 384})


def test_video_matches_hf(hf_video):
    video = frames()
    out = hf_video(videos=[video], return_tensors="pt")["pixel_values_videos"]
    ours = video_views(video, 384, HALF, HALF)
    assert out.shape == (1, 4, 3, 384, 384) and ours.shape == (4, 3, 384, 384) and ours.dtype == torch.float32
    assert torch.equal(out[0], ours)
    # torchvision's resize and the fused normalisation are not the Pillow image path's
    assert not torch.equal(ours[:1], square_view(video[0], 384, HALF, HALF))


def test_video_frames_of_several_sizes_match_hf(hf_video):
    """Frames of different sizes (Hugging Face needs one size per video: compared a frame at a time),
    and a grey frame."""
    grey = drawn(100, 90).convert("L").convert("RGB")
    video = [photo("rocket", 427, 640), drawn(100, 90), photo("coffee", 427, 640), grey]
    ours = video_views(video, 384, HALF, HALF)
    for frame, view in zip(video, ours):
        out = hf_video(videos=[[frame]], return_tensors="pt")["pixel_values_videos"]
        assert torch.equal(out[0, 0], view)


def test_video_tiny_tile_clip_normalisation_matches_hf():
    processor = LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28})  # OpenAI-CLIP mean/std
    video = frames(60, 90)
    out = processor(videos=[video], return_tensors="pt")["pixel_values_videos"]
    assert torch.equal(out[0], video_views(video, 28, CLIP_MEAN, CLIP_STD))


def test_rejects_bad_input():
    good = drawn(20, 20)
    with pytest.raises(ValueError, match="no pixels"):
        anyres_views(Image.new("RGB", (0, 5)), onevision_pinpoints(28), 28, HALF, HALF)
    with pytest.raises(ValueError, match="no pixels"):
        square_view(Image.new("RGB", (5, 0)), 28, HALF, HALF)
    with pytest.raises(ValueError, match="no pixels"):
        video_views([good, Image.new("RGB", (0, 0))], 28, HALF, HALF)
    with pytest.raises(ValueError, match="PIL image"):
        square_view(torch.zeros(3, 8, 8), 28, HALF, HALF)
    with pytest.raises(ValueError, match="at least one frame"):
        video_views([], 28, HALF, HALF)
    with pytest.raises(ValueError, match="3 values"):
        square_view(good, 28, [0.5, 0.5], HALF)
    with pytest.raises(ValueError, match="std"):
        square_view(good, 28, HALF, 0)
    with pytest.raises(ValueError, match="fixed layout"):
        sample_views([good], FIXED, 28, HALF, HALF)
    with pytest.raises(ValueError, match="multiples"):
        sample_views([good], ImageLayout.anyres(tile=384), 28 * 5, HALF, HALF)
    with pytest.raises(ValueError, match="tiles"):
        anyres_views(good, [[100, 100]], 28, HALF, HALF)
