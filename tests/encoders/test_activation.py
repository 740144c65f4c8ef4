"""OpenCLIPEncoder's `activation` option (exact or tanh GELU in every MLP) and its Hugging Face mapping.

timm's `vit_so400m_patch14_siglip_384` uses exact (erf) GELU; Google's SigLIP, Hugging Face's
(`gelu_pytorch_tanh`) and LLaVA-OneVision use the tanh approximation. The references here are
timm's own model built with `act_layer="gelu_tanh"` and Hugging Face's CLIP / SigLIP vision models.

Every tower is randomized first: at their initial scale the pre-activations are so small that tanh
and erf GELU differ by ~2e-6 of the features, too close to fp32 rounding to tell apart. Randomized,
they differ by ~2e-4, while the same computation on other kernels stays within ~1e-6 (fp32) or
~1e-15 (float64), so each comparison below would fail with the other GELU.
"""

import copy

import pytest
import timm
import torch
import transformers
from open_clip.model import _build_vision_tower
from timm.layers import GELUTanh
from timm.models import register_model
from torch import nn

from encoders import OpenCLIPEncoder
from encoders.hf import (
    HFVisionTower, _activation_name, describe_tower, encoder_config_from_hf, vision_state_from_hf, vision_state_to_hf,
)
from tests.encoders.tiny_towers import CONFIGS
from tests.numerics import assert_close_scaled

SIGLIP = CONFIGS["salamandra-test-tiny-siglip"]
CLIP = CONFIGS["salamandra-test-tiny-clip"]
TOWERS = {"siglip": SIGLIP, "clip": CLIP}
PREPROCESS = {"mean": 0.5, "std": 0.5, "resize_mode": "squash"}
FP32_REL = 1e-6  # the same modules on other kernels; tanh vs erf moves the features by ~2e-4
FP64_REL = 1e-9  # transformers' modules against ours in float64 (they agree to ~1e-15)
# The separation demanded of the other GELU: far beyond either tolerance.
DIFFERS_REL = 1e-5


@register_model
def vit_salamandra_test_tiny_tanh(pretrained: bool = False, **kwargs):
    """The tiny SigLIP tower with timm's own tanh GELU (as timm's `vit_so400m_patch16_siglip_*`);
    deliberately not named `*siglip*`, so the Hugging Face import's search never picks it."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return timm.create_model("vit_salamandra_test_tiny_siglip", act_layer="gelu_tanh", **kwargs)


def randomize(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def pixels_for(image_size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def encoder(kind: str, activation=None, seed: int = 1, **options) -> OpenCLIPEncoder:
    torch.manual_seed(0)
    options = {"feature_layer": -1, "drop_cls": False, "preprocess_cfg": PREPROCESS, **options}
    result = OpenCLIPEncoder(TOWERS[kind], activation=activation, **options).eval()
    randomize(result, seed)
    return result


def same_weights(kind: str, source: OpenCLIPEncoder, activation=None, **options) -> OpenCLIPEncoder:
    result = encoder(kind, activation, **options)
    result.load_state_dict(source.state_dict())
    return result


def mlp_activations(model: OpenCLIPEncoder) -> list[nn.Module]:
    if model.tower_type == "open_clip":
        return [block.mlp.gelu for block in model.visual.transformer.resblocks]
    return [block.mlp.act for block in model.visual.trunk.blocks]


def assert_differs(actual, expected, rel=DIFFERS_REL):
    assert (actual - expected).abs().max() > rel * expected.abs().max()


# --- the option ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_option_replaces_every_block_activation(kind):
    assert all(_activation_name(a) == "gelu" for a in mlp_activations(encoder(kind)))
    tanh = mlp_activations(encoder(kind, "gelu_tanh"))
    assert len(tanh) == 4 and all(_activation_name(a) == "gelu_pytorch_tanh" for a in tanh)
    if kind == "siglip":
        assert all(type(a) is GELUTanh for a in tanh)  # what timm builds for act_layer="gelu_tanh"
    exact = mlp_activations(encoder(kind, "gelu"))
    assert all(type(a) is nn.GELU and _activation_name(a) == "gelu" for a in exact)


def test_option_replaces_the_attention_pool_activation():
    """Our encoder drops the MAP head (it never affects the features); the replacement covers it
    anyway, so the option means the same on a whole tower."""
    from encoders.open_clip import _set_activation

    visual = _build_vision_tower(SIGLIP["embed_dim"], SIGLIP["vision_cfg"])
    assert visual.trunk.attn_pool is not None
    _set_activation(visual, "timm", "gelu_tanh")
    assert type(visual.trunk.attn_pool.mlp.act) is GELUTanh
    assert all(type(block.mlp.act) is GELUTanh for block in visual.trunk.blocks)


def test_option_is_validated():
    for bad in ("tanh", "gelu_pytorch_tanh", "quick_gelu", "GELU", 1):
        with pytest.raises(ValueError, match="activation must be None"):
            OpenCLIPEncoder(SIGLIP, activation=bad)


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_config_round_trips_the_option_and_old_configs_load_as_before(kind):
    tanh = encoder(kind, "gelu_tanh")
    assert tanh.config()["activation"] == "gelu_tanh"
    rebuilt = OpenCLIPEncoder(**copy.deepcopy(tanh.config()))
    rebuilt.load_state_dict(tanh.state_dict())
    pixels = pixels_for()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(pixels), tanh(pixels))
    # A tower with its own activation saves what it saved before the option existed, and a config
    # without the key builds the tower's own activation.
    plain = encoder(kind)
    assert "activation" not in plain.config() and plain.activation is None
    old = OpenCLIPEncoder(**plain.config())
    assert old.activation is None
    assert [type(a) for a in mlp_activations(old)] == [type(a) for a in mlp_activations(plain)]
    assert encoder(kind, "gelu").config()["activation"] == "gelu"


# --- against timm itself -------------------------------------------------------------------


def timm_features(act_layer, source: OpenCLIPEncoder, pixels):
    """timm's own tiny SigLIP model, built with `act_layer`, holding `source`'s weights: its
    last block's output (the final norm replaced by an identity, as our features are unnormed)."""
    model = timm.create_model("vit_salamandra_test_tiny_siglip", act_layer=act_layer).eval()
    ours = {k.removeprefix("visual.trunk."): v for k, v in source.state_dict().items()}
    missing, _ = model.load_state_dict(ours, strict=False)
    assert all(name.startswith(("norm.", "fc_norm.", "attn_pool.", "head.")) for name in missing), missing
    model.norm = nn.Identity()
    with torch.no_grad():
        return model.forward_features(pixels)


def test_gelu_tanh_equals_timm_built_with_gelu_tanh():
    tanh = encoder("siglip", "gelu_tanh")
    erf = same_weights("siglip", tanh)
    exact = same_weights("siglip", tanh, "gelu")
    pixels = pixels_for()
    with torch.no_grad():
        ours_tanh, ours_erf, ours_exact = tanh(pixels), erf(pixels), exact(pixels)
    timm_tanh = timm_features("gelu_tanh", tanh, pixels)
    timm_erf = timm_features(None, tanh, pixels)  # the model's own: exact GELU
    assert_close_scaled(ours_tanh, timm_tanh, rel=FP32_REL, msg="gelu_tanh")
    assert_close_scaled(ours_erf, timm_erf, rel=FP32_REL, msg="the tower's own")
    assert_close_scaled(ours_exact, timm_erf, rel=FP32_REL, msg="gelu")
    # The test can fail: the two GELUs differ by far more than the tolerance.
    assert_differs(ours_tanh, timm_erf, rel=100 * FP32_REL)
    assert_differs(timm_tanh, timm_erf, rel=100 * FP32_REL)


def test_gelu_tanh_equals_a_manual_reference():
    """The tiny SigLIP tower written out with F.gelu(approximate="tanh"), from the weights alone.
    In float64: its attention is not SDPA's kernel, and in fp32 the two differ by up to ~5e-7."""
    tanh = encoder("siglip", "gelu_tanh")
    erf = same_weights("siglip", tanh).double()
    tanh = tanh.double()
    trunk = tanh.visual.trunk
    pixels = pixels_for().double()
    with torch.no_grad():
        hidden = trunk.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + trunk.pos_embed
        for block in trunk.blocks:
            x = block.norm1(hidden)
            batch, tokens, width = x.shape
            heads = block.attn.num_heads
            q, k, v = block.attn.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
            weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
            hidden = hidden + block.attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))
            x = block.mlp.fc1(block.norm2(hidden))
            hidden = hidden + block.mlp.fc2(torch.nn.functional.gelu(x, approximate="tanh"))
        ours = tanh(pixels)
        theirs_erf = erf(pixels)
    assert_close_scaled(ours, hidden, rel=FP64_REL)
    assert_differs(theirs_erf, hidden, rel=100 * FP32_REL)


# --- against Hugging Face, through encoders.hf's mapping -----------------------------------


def hf_vision_model(model: OpenCLIPEncoder):
    tower, problems = describe_tower(model)
    assert tower is not None, problems
    config = tower.to_hf()
    if tower.kind == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**config))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**config))
    # transformers 5 names the vision model's weights without a `vision_model.` prefix.
    hf.load_state_dict(vision_state_to_hf(model, tower), strict=True)
    return tower, hf.eval()


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_hf_vision_model_with_gelu_pytorch_tanh_equals_ours(kind):
    """Hugging Face's SiglipVisionModel / CLIPVisionModel, configured and loaded through
    encoders.hf (hidden_act gelu_pytorch_tanh), in float64: every hidden state equal."""
    tanh = encoder(kind, "gelu_tanh")
    tower, hf = hf_vision_model(tanh)
    assert tower.hidden_act == "gelu_pytorch_tanh" and hf.config.hidden_act == "gelu_pytorch_tanh"
    erf_tower, erf_hf = hf_vision_model(same_weights(kind, tanh))
    assert erf_tower.hidden_act == "gelu"
    pixels = pixels_for().double()
    tanh, hf, erf_hf = tanh.double(), hf.double(), erf_hf.double()
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        theirs_erf = erf_hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in range(len(theirs)):
            ours = OpenCLIPEncoder(**{**tanh.config(), "feature_layer": layer}).double().eval()
            ours.load_state_dict(tanh.state_dict(), strict=False)  # its first `layer` blocks
            assert_close_scaled(ours(pixels), theirs[layer], rel=FP64_REL, msg=f"hidden state {layer}")
    assert len(theirs) == 5
    assert_close_scaled(tanh(pixels), theirs[-1], rel=FP64_REL)
    assert_differs(theirs_erf[-1], theirs[-1], rel=100 * FP32_REL)


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_exact_gelu_towers_still_export_gelu(kind):
    assert describe_tower(encoder(kind))[0].hidden_act == "gelu"
    assert describe_tower(encoder(kind, "gelu"))[0].hidden_act == "gelu"


def processor():
    return {"image_processor_type": "CLIPImageProcessor", "size": {"height": 32, "width": 32},
            "crop_size": {"height": 32, "width": 32}, "do_center_crop": False, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "resample": 3}


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_import_of_a_gelu_pytorch_tanh_tower_builds_gelu_tanh(kind):
    """A gelu_pytorch_tanh tower imports as activation="gelu_tanh" (the tiny timm model's own GELU
    is exact, as that of timm's vit_so400m_patch14_siglip_384); a gelu one without the key."""
    tanh = encoder(kind, "gelu_tanh")
    tower, _ = describe_tower(tanh)
    config = encoder_config_from_hf(HFVisionTower.from_hf(tower.to_hf()), processor(), -1, drop_cls=False)
    assert config["activation"] == "gelu_tanh"
    back = OpenCLIPEncoder(**config).eval()
    back.load_state_dict(vision_state_from_hf(vision_state_to_hf(tanh, tower), tower, back.num_layers), strict=True)
    pixels = pixels_for()
    with torch.no_grad():
        assert torch.equal(back(pixels), tanh(pixels))
    erf_tower, _ = describe_tower(same_weights(kind, tanh))
    erf_config = encoder_config_from_hf(HFVisionTower.from_hf(erf_tower.to_hf()), processor(), -1, drop_cls=False)
    assert "activation" not in erf_config


def test_import_prefers_a_timm_model_whose_own_gelu_is_the_towers():
    """Given a timm model with tanh GELU, a gelu_pytorch_tanh tower needs no option, an exact one
    gets activation="gelu"; an activation the option cannot build is refused by name."""
    tower, _ = describe_tower(encoder("siglip", "gelu_tanh"))
    name = "vit_salamandra_test_tiny_tanh"
    config = encoder_config_from_hf(tower, processor(), -1, drop_cls=True, timm_model_name=name)
    assert config["model_name"]["vision_cfg"]["timm_model_name"] == name and "activation" not in config
    assert all(type(a) is GELUTanh for a in mlp_activations(OpenCLIPEncoder(**config)))
    erf = HFVisionTower.from_hf({**tower.to_hf(), "hidden_act": "gelu"})
    config = encoder_config_from_hf(erf, processor(), -1, drop_cls=True, timm_model_name=name)
    assert config["activation"] == "gelu"
    assert all(_activation_name(a) == "gelu" for a in mlp_activations(OpenCLIPEncoder(**config)))
    new = HFVisionTower.from_hf({**tower.to_hf(), "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="its activation is 'gelu_pytorch_tanh', not 'gelu_new'"):
        encoder_config_from_hf(new, processor(), -1, drop_cls=True, timm_model_name=name)
    with pytest.raises(ValueError, match="matches except that its activation is 'gelu', not 'gelu_new'"):
        encoder_config_from_hf(new, processor(), -1, drop_cls=True)


def test_clip_tower_with_another_activation_is_still_refused():
    with pytest.raises(ValueError, match="CLIP tower hidden_act 'gelu_new'"):
        HFVisionTower.from_hf({"model_type": "clip_vision_model", "hidden_act": "gelu_new"})
