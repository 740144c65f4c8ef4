"""OpenCLIPEncoder against open_clip itself, on tiny towers whose checkpoints the tests write.

Three towers cover the code paths: open_clip's own ViT (CLIP), a timm ViT shaped like open_clip's
SigLIP configs (no class token, MAP head, vit_base_patch16_siglip_224's entrypoint shrunk), and a
timm ViT with class + register tokens kept outside the position table and a pre-norm.
"""

import json

import open_clip
import pytest
import torch
from open_clip.pretrained import _PRETRAINED
from safetensors.torch import save_file

from encoders import OpenCLIPEncoder
from tests.encoders.tiny_towers import CONFIGS, TINY_TEXT
from tests.numerics import assert_close_scaled

NUM_BLOCKS = {"salamandra-test-tiny-clip": 4, "salamandra-test-tiny-siglip": 4, "salamandra-test-tiny-prefix": 3}
PREFIX_TOKENS = {"salamandra-test-tiny-clip": 1, "salamandra-test-tiny-siglip": 0, "salamandra-test-tiny-prefix": 3}
# How each test checkpoint is written: the plain state dict, or wrapped like a training checkpoint.
CHECKPOINT_FORMAT = {
    "salamandra-test-tiny-clip": ".safetensors",
    "salamandra-test-tiny-siglip": ".pt",
    "salamandra-test-tiny-prefix": ".pth",
}


@pytest.fixture(scope="module", autouse=True)
def registered_configs(tmp_path_factory):
    """Register the tiny configs by name, so open_clip.create_model and our encoder both see them."""
    directory = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in CONFIGS.items():
        (directory / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(directory)
    assert set(CONFIGS) <= set(open_clip.list_models())


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter, so a skipped norm, bias or embedding cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def write_checkpoint(model: torch.nn.Module, path) -> None:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    elif str(path).endswith(".pt"):
        # As a DDP training run saves it: wrapped, `module.`-prefixed, with non-tensor extras.
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint path, open_clip's full model loaded by open_clip from that same file)."""
    directory = tmp_path_factory.mktemp("checkpoints")
    result = {}
    for seed, name in enumerate(CONFIGS):
        source = open_clip.create_model(name)
        randomize(source, seed)
        path = directory / f"{name}{CHECKPOINT_FORMAT[name]}"
        write_checkpoint(source, path)
        reference = open_clip.create_model(name, pretrained=str(path)).eval()
        result[name] = (path, reference)
    return result


def pixels_for(image_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def reference_hidden_state(visual: torch.nn.Module, pixels: torch.Tensor, layer: int, drop_cls: bool):
    """hidden_states[layer] (Hugging Face indexing) from open_clip's forward_intermediates.

    Layer 0 (the block input) is not an output of forward_intermediates; it is written out by hand
    from the tower's parameters.
    """
    if layer > 0:
        out = visual.forward_intermediates(
            pixels, indices=[layer - 1], output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
        )
        tokens = out["image_intermediates"][0]
        if drop_cls or "image_intermediates_prefix" not in out:
            return tokens
        return torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)

    if hasattr(visual, "trunk"):
        trunk = visual.trunk
        patches = trunk.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        prefix = [t.expand(len(pixels), -1, -1) for t in (trunk.cls_token, trunk.reg_token) if t is not None]
        if trunk.no_embed_class:
            hidden = torch.cat(prefix + [patches + trunk.pos_embed], dim=1)
        else:
            hidden = torch.cat(prefix + [patches], dim=1) + trunk.pos_embed
        hidden = trunk.norm_pre(hidden)
        num_prefix = sum(t.shape[1] for t in prefix)
    else:
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(len(pixels), 1, -1)
        hidden = visual.ln_pre(torch.cat([cls, patches], dim=1) + visual.positional_embedding)
        num_prefix = 1
    return hidden[:, num_prefix:] if drop_cls else hidden


@pytest.mark.parametrize("name", list(CONFIGS))
def test_features_equal_open_clip(name, checkpoints):
    path, reference = checkpoints[name]
    blocks = NUM_BLOCKS[name]
    pixels = pixels_for(reference.visual.image_size[0])
    for feature_layer in (-1, -2, 0, 2, -(blocks + 1), blocks):
        layer = feature_layer % (blocks + 1)
        for drop_cls in (True, False):
            encoder = OpenCLIPEncoder(
                name, pretrained=str(path), feature_layer=feature_layer, drop_cls=drop_cls
            ).eval()  # same mode as the reference: eval selects PyTorch's fused attention path
            with torch.no_grad():
                ours = encoder(pixels)
                expected = reference_hidden_state(reference.visual, pixels, layer, drop_cls)
            assert ours.shape == (2, encoder.num_tokens, encoder.hidden_size)
            # Both sides run open_clip's own modules (no difference under any CPU kernel set so
            # far), so a few ulps of the features' largest entry (up to ~35 here), not an atol.
            assert_close_scaled(ours, expected, rel=1e-6, msg=f"{feature_layer=}, {drop_cls=}")


def test_siglip_style_tower_has_no_prefix_tokens(checkpoints):
    path, _ = checkpoints["salamandra-test-tiny-siglip"]
    kept = OpenCLIPEncoder("salamandra-test-tiny-siglip", pretrained=str(path), drop_cls=False)
    dropped = OpenCLIPEncoder("salamandra-test-tiny-siglip", pretrained=str(path), drop_cls=True)
    assert kept.tower_type == "timm" and kept.num_prefix_tokens == 0
    assert kept.num_tokens == dropped.num_tokens == (32 // 8) ** 2
    pixels = pixels_for(32)
    with torch.no_grad():
        assert torch.equal(kept(pixels), dropped(pixels))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("feature_layer", [-2, 0])
def test_only_kept_visual_weights_remain(name, feature_layer, checkpoints):
    _, reference = checkpoints[name]
    encoder = OpenCLIPEncoder(name, feature_layer=feature_layer)
    kept_blocks = feature_layer % (NUM_BLOCKS[name] + 1)
    assert encoder.num_layers_total == NUM_BLOCKS[name] and encoder.num_layers == kept_blocks

    # Expected names, derived from the full open_clip model: visual only, blocks up to the
    # feature layer, nothing of the head (final norm, pooling, projection).
    head = ("ln_post", "proj", "attn_pool", "trunk.norm.", "trunk.fc_norm", "trunk.attn_pool", "trunk.head", "head.")
    expected = {}
    for key, tensor in reference.state_dict().items():
        if not key.startswith("visual."):
            continue
        local = key[len("visual."):]
        parts = local.split(".")
        if parts[:2] in (["transformer", "resblocks"], ["trunk", "blocks"]) and int(parts[2]) >= kept_blocks:
            continue
        if local.startswith(head):
            continue
        expected[key] = tensor.numel()
    state = encoder.state_dict()
    assert set(state) == set(expected)
    assert sum(p.numel() for p in encoder.parameters()) == sum(expected.values())
    assert all(key.startswith("visual.") for key in state)
    blocks = encoder.visual.transformer.resblocks if encoder.tower_type == "open_clip" else encoder.visual.trunk.blocks
    assert len(blocks) == kept_blocks


def test_text_tower_is_never_built(monkeypatch, checkpoints):
    def refuse(*args, **kwargs):
        raise AssertionError("the text tower was built")

    monkeypatch.setattr(open_clip.model, "_build_text_tower", refuse)
    path, _ = checkpoints["salamandra-test-tiny-clip"]
    encoder = OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained=str(path))
    assert encoder.num_tokens == 16


def test_bad_checkpoint_keys_are_named(tmp_path, checkpoints):
    path, reference = checkpoints["salamandra-test-tiny-clip"]
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    del state["visual.conv1.weight"]
    state["visual.bogus.weight"] = torch.zeros(3)
    state["visual.ln_pre.bias"] = torch.zeros(5)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError) as error:
        OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained=str(bad))
    message = str(error.value)
    assert "missing keys: visual.conv1.weight" in message
    assert "unexpected keys: visual.bogus.weight" in message
    assert "visual.ln_pre.bias: checkpoint (5,) vs model (64,)" in message

    text_only = tmp_path / "text.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, text_only)
    with pytest.raises(ValueError, match="no 'visual.\\*' keys"):
        OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained=str(text_only))

    wrong_tower = checkpoints["salamandra-test-tiny-siglip"][0]
    with pytest.raises(ValueError, match="missing keys: visual.class_embedding"):
        OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained=str(wrong_tower))

    other_format = tmp_path / "weights.npz"
    other_format.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported weights file type"):
        OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained=str(other_format))


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("arbitrary code ran while loading weights",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}, "extra": RunsCodeWhenUnpickled()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained=str(path))


def test_unknown_pretrained_tag_is_refused():
    with pytest.raises(ValueError, match="neither an existing file nor a known tag"):
        OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained="no-such-tag")


def test_pretrained_tag_resolution(monkeypatch, checkpoints):
    """The tag path, through open_clip's registry and download function, with a local 'download'.

    The tag's weights were trained with QuickGELU and its own normalization: both must follow.
    """
    path, _ = checkpoints["salamandra-test-tiny-clip"]
    tag_cfg = {"file": str(path), "mean": (0.25, 0.5, 0.75), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "resize_mode": "squash", "quick_gelu": True}
    monkeypatch.setitem(_PRETRAINED, "salamandra-test-tiny-clip", {"local": tag_cfg})

    encoder = OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained="local", feature_layer=-1)
    assert encoder.mean == (0.25, 0.5, 0.75) and encoder.interpolation == "bilinear"
    assert encoder.resize_mode == "squash"

    reference = open_clip.create_model("salamandra-test-tiny-clip", pretrained=str(path), force_quick_gelu=True)
    gelu_encoder = OpenCLIPEncoder("salamandra-test-tiny-clip", pretrained=str(path), feature_layer=-1)
    pixels = pixels_for(32)
    with torch.no_grad():
        expected = reference_hidden_state(reference.visual, pixels, 4, drop_cls=True)
        assert_close_scaled(encoder(pixels), expected, rel=1e-6)
        # The activation really differs: by far more than that tolerance.
        assert (gelu_encoder(pixels) - expected).abs().max() > 100 * 1e-6 * expected.abs().max()

    rebuilt = OpenCLIPEncoder(**json.loads(json.dumps(encoder.config())))
    rebuilt.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(pixels), encoder(pixels))
    assert rebuilt.mean == encoder.mean and rebuilt.resize_mode == "squash"


def test_feature_layer_out_of_range():
    for feature_layer in (5, -6, 100):
        with pytest.raises(ValueError, match="out of range for a tower with 4 blocks: use -5..4"):
            OpenCLIPEncoder("salamandra-test-tiny-clip", feature_layer=feature_layer)
    for feature_layer in (1.0, True, "-2"):
        with pytest.raises(ValueError, match="must be an int"):
            OpenCLIPEncoder("salamandra-test-tiny-clip", feature_layer=feature_layer)


def test_forward_rejects_bad_pixels():
    encoder = OpenCLIPEncoder("salamandra-test-tiny-siglip")
    for shape in ((2, 3, 31, 32), (3, 32, 32), (2, 1, 32, 32), (2, 32, 32, 3)):
        with pytest.raises(ValueError, match=r"expected pixels of shape \[N, 3, 32, 32\]"):
            encoder(torch.zeros(shape))
    with pytest.raises(ValueError, match="float"):
        encoder(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_rebuilds_the_architecture(name):
    # As a dict config (text_cfg included: it must be ignored) and by registered name.
    for model_name in (CONFIGS[name], name):
        encoder = OpenCLIPEncoder(model_name, feature_layer=1, drop_cls=False,
                                  preprocess_cfg={"mean": 0.5, "std": (0.5, 0.25, 0.5), "resize_mode": "longest"})
        config = json.loads(json.dumps(encoder.config()))  # must survive JSON unchanged
        assert config == encoder.config()
        rebuilt = OpenCLIPEncoder(**config)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in encoder.state_dict().items()}
        for attribute in ("hidden_size", "num_tokens", "image_size", "mean", "std", "resize_mode",
                          "interpolation", "num_layers_total", "num_layers"):
            assert getattr(rebuilt, attribute) == getattr(encoder, attribute), attribute
        assert encoder.num_tokens == (encoder.image_size // encoder.patch_size) ** 2 + PREFIX_TOKENS[name]
        assert encoder.mean == (0.5, 0.5, 0.5) and encoder.std == (0.5, 0.25, 0.5)
        rebuilt.load_state_dict(encoder.state_dict())
        pixels = pixels_for(encoder.image_size)
        with torch.no_grad():
            assert torch.equal(rebuilt(pixels), encoder(pixels))


def test_registered_open_clip_names_on_meta_device():
    with torch.device("meta"):  # architecture and preprocessing only: no memory, no download
        clip = OpenCLIPEncoder("ViT-B-32")
        clip_336 = OpenCLIPEncoder("ViT-L-14-336-quickgelu", drop_cls=False)
        siglip = OpenCLIPEncoder("ViT-SO400M-14-SigLIP-384")
        siglip2 = OpenCLIPEncoder("ViT-B-16-SigLIP2-256", feature_layer=-1)

    assert (clip.image_size, clip.hidden_size, clip.num_tokens, clip.num_layers_total) == (224, 768, 49, 12)
    assert clip.mean == open_clip.OPENAI_DATASET_MEAN and clip.std == open_clip.OPENAI_DATASET_STD
    assert (clip.resize_mode, clip.interpolation, clip.tower_type) == ("shortest", "bicubic", "open_clip")
    assert (clip_336.image_size, clip_336.hidden_size, clip_336.num_tokens) == (336, 1024, 577)

    assert (siglip.image_size, siglip.hidden_size, siglip.num_tokens) == (384, 1152, 729)
    assert (siglip.num_layers_total, siglip.num_layers, siglip.tower_type) == (27, 26, "timm")
    assert siglip.mean == siglip.std == (0.5, 0.5, 0.5) and siglip.resize_mode == "squash"
    assert (siglip2.image_size, siglip2.num_tokens, siglip2.num_layers, siglip2.mean) == (256, 256, 12, (0.5,) * 3)
    assert all(p.device.type == "meta" for p in siglip.parameters())
    assert siglip.config()["model_name"] == "ViT-SO400M-14-SigLIP-384"


def test_unsupported_towers_and_names():
    with torch.device("meta"):
        with pytest.raises(ValueError, match="unsupported vision tower ModifiedResNet"):
            OpenCLIPEncoder("RN50")
        with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-33'"):
            OpenCLIPEncoder("ViT-B-33")
        with pytest.raises(ValueError, match="schema names are not supported"):
            OpenCLIPEncoder("hf-hub:timm/ViT-B-16-SigLIP")
        with pytest.raises(ValueError, match="'embed_dim' and 'vision_cfg'"):
            OpenCLIPEncoder({"vision_cfg": {"layers": 2}})
