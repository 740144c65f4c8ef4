"""Vision towers <-> Hugging Face CLIP / SigLIP vision models: configs, weight names, preprocessing.

Two tower families have a Hugging Face equivalent:
- open_clip's own VisionTransformer (`tower_type == "open_clip"`) is a `CLIPVisionModel`
  (`model_type: clip_vision_model`), class token included;
- a timm ViT without class or register tokens (`tower_type == "timm"`, open_clip's SigLIP towers)
  is a `SiglipVisionModel` (`model_type: siglip_vision_model`).

`HFVisionTower` is what both sides need to know of such a tower. Going out, `describe_tower` reads
it off an `OpenCLIPEncoder`'s modules (activation and LayerNorm epsilon included, so the Hugging
Face tower computes what ours does) or says why there is none; `HFVisionTower.to_hf` is the vision
config, `vision_state_to_hf` the weights under the vision model's names (`embeddings.*`,
`encoder.layers.N.*`, `post_layernorm.*`) and `image_processor_to_hf` the CLIPImageProcessor
settings of our preprocessing. Coming back, `HFVisionTower.from_hf` reads a vision config,
`encoder_config_from_hf` gives the `OpenCLIPEncoder` arguments of that tower (for SigLIP, a
registered timm model of the same architecture, since open_clip builds those towers by timm name;
the encoder's `activation` option where the tower's GELU is not the model's own, such as a
`gelu_pytorch_tanh` SigLIP on a timm model with exact GELU) and `vision_state_from_hf` the weights
under our `visual.*` names. A tower built with `activation="gelu_tanh"` goes out as
`gelu_pytorch_tanh` (the activation is read off its modules).

Our towers keep only the blocks up to the feature layer; the weights going out are those of that
truncated tower, whose last hidden state is our feature. The tower's final LayerNorm, never
applied to those features, is written as an identity (ones, zeros) so the vision model is complete.

Hugging Face image processors store Pillow's resampling filter numbers; only bilinear and bicubic
resizing, with a shortest-edge resize and centre crop (`shortest`) or a direct resize (`squash`),
have an equivalent on both sides.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.open_clip import OpenCLIPEncoder

__all__ = [
    "HFVisionTower",
    "describe_tower",
    "encoder_config_from_hf",
    "image_processor_to_hf",
    "read_image_processor_config",
    "vision_state_from_hf",
    "vision_state_to_hf",
]

# Pillow resampling filter numbers, as Hugging Face image processors store them.
_RESAMPLE = {"bilinear": 2, "bicubic": 3}
_RESAMPLE_NAMES = {number: name for name, number in _RESAMPLE.items()}
_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
# Hugging Face ACT2FN names our encoder's `activation` option builds exactly (open_clip's
# quick_gelu is the model config's own flag, not this option).
_ENCODER_ACTIVATION = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class HFVisionTower:
    """What Hugging Face's CLIP / SigLIP vision config needs to know about a tower."""

    kind: str  # "clip" (open_clip VisionTransformer) or "siglip" (timm ViT without prefix tokens)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, vision_config: Mapping[str, Any]) -> HFVisionTower:
        """The tower of a `clip_vision_model` or `siglip_vision_model` config (Hugging Face's
        defaults for absent fields), or ValueError for other towers and activations open_clip lacks."""
        kind = {model_type: kind for kind, model_type in _MODEL_TYPES.items()}.get(vision_config.get("model_type"))
        if kind is None:
            raise ValueError(f"vision tower {vision_config.get('model_type')!r}: only clip_vision_model and "
                             "siglip_vision_model have open_clip equivalents")
        hidden_act = vision_config.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
        if kind == "clip" and hidden_act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"CLIP tower hidden_act {hidden_act!r}: open_clip's ViT has gelu or quick_gelu, and "
                             "gelu_pytorch_tanh with the encoder option activation='gelu_tanh'")
        return cls(
            kind, vision_config.get("hidden_size", 768), vision_config.get("intermediate_size", 3072),
            vision_config.get("num_hidden_layers", 12), vision_config.get("num_attention_heads", 12),
            int(vision_config.get("image_size", 224)), int(vision_config.get("patch_size", 16)), hidden_act,
            float(vision_config.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The tower's Hugging Face vision config (CLIPVisionConfig / SiglipVisionConfig fields)."""
        config = {
            "model_type": _MODEL_TYPES[self.kind],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_channels": 3,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
        }
        if self.kind == "clip":
            config["projection_dim"] = self.hidden_size  # CLIP's contrastive projection: not part of the tower
        else:
            config["vision_use_head"] = False  # the MAP pooling head: a VLM uses the patch tokens
        return config


def _vision_pairs(kind: str, num_layers: int) -> list[tuple[str, list[str], str]]:
    """(our name under `visual.`, Hugging Face names under the vision model, how): how is "copy",
    "qkv" (our fused projection = q, k, v stacked along dim 0) or "pos" (ours [1, N, D], theirs [N, D])."""
    if kind == "clip":
        pairs = [
            ("conv1.weight", ["embeddings.patch_embedding.weight"], "copy"),
            ("class_embedding", ["embeddings.class_embedding"], "copy"),
            ("positional_embedding", ["embeddings.position_embedding.weight"], "copy"),
            ("ln_pre.weight", ["pre_layrnorm.weight"], "copy"),
            ("ln_pre.bias", ["pre_layrnorm.bias"], "copy"),
        ]
        block = "transformer.resblocks.{}."
        names = {"norm1": "ln_1", "qkv": "attn.in_proj_", "out": "attn.out_proj", "norm2": "ln_2",
                 "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
    else:
        pairs = [
            ("trunk.patch_embed.proj.weight", ["embeddings.patch_embedding.weight"], "copy"),
            ("trunk.patch_embed.proj.bias", ["embeddings.patch_embedding.bias"], "copy"),
            ("trunk.pos_embed", ["embeddings.position_embedding.weight"], "pos"),
        ]
        block = "trunk.blocks.{}."
        names = {"norm1": "norm1", "qkv": "attn.qkv.", "out": "attn.proj", "norm2": "norm2",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for i in range(num_layers):
        ours, theirs = block.format(i), f"encoder.layers.{i}."
        for param in ("weight", "bias"):
            pairs += [
                (f"{ours}{names['norm1']}.{param}", [f"{theirs}layer_norm1.{param}"], "copy"),
                (f"{ours}{names['qkv']}{param}",
                 [f"{theirs}self_attn.{p}_proj.{param}" for p in ("q", "k", "v")], "qkv"),
                (f"{ours}{names['out']}.{param}", [f"{theirs}self_attn.out_proj.{param}"], "copy"),
                (f"{ours}{names['norm2']}.{param}", [f"{theirs}layer_norm2.{param}"], "copy"),
                (f"{ours}{names['fc1']}.{param}", [f"{theirs}mlp.fc1.{param}"], "copy"),
                (f"{ours}{names['fc2']}.{param}", [f"{theirs}mlp.fc2.{param}"], "copy"),
            ]
    return pairs


def _activation_name(module: nn.Module) -> str | None:
    """The Hugging Face ACT2FN name that computes exactly what `module` does, found by evaluating
    it (class names differ between open_clip, timm and torch versions), or None."""
    probe = torch.linspace(-6, 6, 97, dtype=torch.float32)
    with torch.no_grad():
        out = module(probe)
    candidates = {
        "gelu": F.gelu(probe),
        "gelu_pytorch_tanh": F.gelu(probe, approximate="tanh"),
        "quick_gelu": probe * torch.sigmoid(1.702 * probe),
    }
    for name, expected in candidates.items():
        if torch.equal(out, expected):
            return name
    return None


def describe_tower(encoder: OpenCLIPEncoder) -> tuple[HFVisionTower | None, list[str]]:
    """(the tower's Hugging Face description, []), or (None, every reason the encoder cannot be
    expressed in Hugging Face terms: its preprocessing first, then its tower)."""
    problems: list[str] = []
    if encoder.resize_mode == "longest":
        problems.append("preprocessing resize_mode 'longest' (fit and pad with fill_color) cannot be reproduced by "
                        "Hugging Face's CLIPImageProcessor; use 'shortest' (resize and centre crop) or 'squash'")
    if encoder.interpolation not in _RESAMPLE:
        problems.append(f"preprocessing interpolation {encoder.interpolation!r}: use bicubic or bilinear")
    tower = _describe_blocks(encoder, problems)
    return (tower if not problems else None), problems


def _describe_blocks(encoder: OpenCLIPEncoder, problems: list[str]) -> HFVisionTower | None:
    """The tower's Hugging Face description, or None with the reasons appended to `problems`."""
    visual = encoder.visual
    if encoder.tower_type == "open_clip":
        from open_clip.transformer import ResidualAttentionBlock

        kind, blocks = "clip", list(visual.transformer.resblocks)
        if not isinstance(visual.ln_pre, nn.LayerNorm):
            problems.append("the tower has no pre-norm (vision_cfg no_ln_pre=True); Hugging Face's CLIP always has one")
            return None
        norms = [visual.ln_pre]
        for i, block in enumerate(blocks):
            if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention):
                problems.append(f"vision block {i} is a {type(block).__name__} (vision_cfg block_type / qk_norm / "
                                "scale_* options); only open_clip's default ResidualAttentionBlock maps to CLIP")
                return None
            norms += [block.ln_1, block.ln_2]
        act = blocks[0].mlp.gelu if blocks else None
        heads = blocks[0].attn.num_heads if blocks else 1
        intermediate = blocks[0].mlp.c_fc.out_features if blocks else 4 * encoder.hidden_size
    else:
        from timm.models.vision_transformer import Attention, Block
        from timm.layers import Mlp

        kind, trunk = "siglip", visual.trunk
        blocks = list(trunk.blocks)
        if trunk.num_prefix_tokens:
            problems.append(f"the timm tower has {trunk.num_prefix_tokens} class/register tokens; Hugging Face's "
                            "SigLIP vision model has none (towers with prefix tokens have no HF LLaVA equivalent)")
            return None
        if getattr(trunk, "dynamic_img_size", False):
            problems.append("the timm tower uses dynamic_img_size; Hugging Face's SigLIP has a fixed position table")
            return None
        norms = []
        for i, block in enumerate(blocks):
            if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
                problems.append(f"vision block {i} is a {type(block).__name__} with {type(block.attn).__name__} / "
                                f"{type(block.mlp).__name__}; only timm's plain pre-norm ViT Block maps to SigLIP")
                return None
            norms += [block.norm1, block.norm2]
        act = blocks[0].mlp.act if blocks else None
        heads = blocks[0].attn.num_heads if blocks else 1
        intermediate = blocks[0].mlp.fc1.out_features if blocks else 4 * encoder.hidden_size

    eps = {float(n.eps) for n in norms if isinstance(n, nn.LayerNorm)}
    if any(not isinstance(n, nn.LayerNorm) for n in norms) or len(eps) > 1:
        problems.append(f"the tower's norms are not LayerNorms with one epsilon (found {sorted(eps)})")
        return None
    acts = {_activation_name(b.mlp.gelu if kind == "clip" else b.mlp.act) for b in blocks}
    hidden_act = _activation_name(act) if act is not None else "gelu"
    if None in acts or len(acts) > 1:
        problems.append(f"the tower's MLP activation ({type(act).__name__}) is not one Hugging Face computes "
                        "exactly (gelu, gelu_pytorch_tanh or quick_gelu)")
        return None
    tower = HFVisionTower(kind, encoder.hidden_size, intermediate, len(blocks), heads, encoder.image_size,
                          encoder.patch_size, hidden_act, eps.pop() if eps else 1e-5)

    # Every tensor must have its Hugging Face place, and nothing else may be there: layer scale
    # (ls_*.gamma), qk-norm, attention-pool leftovers, a SigLIP pre-norm all show up here.
    ours = {name for name, _, _ in _vision_pairs(kind, tower.num_layers)}
    have = {k.removeprefix("visual.") for k in encoder.state_dict()}
    extra, missing = sorted(have - ours), sorted(ours - have)
    if extra or missing:
        detail = "; ".join(part for part in (
            f"tensors without a Hugging Face {kind.upper()} equivalent: {extra[:6]}" if extra else "",
            f"tensors Hugging Face needs that the tower lacks (e.g. biases): {missing[:6]}" if missing else "",
        ) if part)
        problems.append(f"the vision tower does not have the {kind.upper()} layout: {detail}")
        return None
    return tower


def vision_state_to_hf(encoder: OpenCLIPEncoder, tower: HFVisionTower) -> dict[str, torch.Tensor]:
    """The encoder's weights under the Hugging Face vision model's names (`tower` from
    `describe_tower(encoder)`), the final LayerNorm an identity (see the module docstring)."""
    state = {k.removeprefix("visual."): v for k, v in encoder.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in _vision_pairs(tower.kind, tower.num_layers):
        tensor = state[ours]
        if how == "qkv":
            for name, part in zip(theirs, tensor.chunk(3, dim=0)):
                out[name] = part
        elif how == "pos":
            out[theirs[0]] = tensor.reshape(-1, tensor.shape[-1])
        else:
            out[theirs[0]] = tensor
    dtype = next(iter(state.values())).dtype
    out["post_layernorm.weight"] = torch.ones(tower.hidden_size, dtype=dtype)
    out["post_layernorm.bias"] = torch.zeros(tower.hidden_size, dtype=dtype)
    return out


def vision_state_from_hf(
    vision: Mapping[str, torch.Tensor], tower: HFVisionTower, num_layers: int
) -> dict[str, torch.Tensor]:
    """The first `num_layers` blocks (and the embeddings) of a Hugging Face vision model's weights
    (names under the vision model), under our encoder's `visual.*` names; ValueError when any lacks."""
    out = {}
    for ours, theirs, how in _vision_pairs(tower.kind, num_layers):
        missing = [name for name in theirs if name not in vision]
        if missing:
            raise ValueError(f"the checkpoint lacks vision tensors {missing}")
        if how == "qkv":
            out[ours] = torch.cat([vision[name] for name in theirs], dim=0)
        elif how == "pos":
            out[ours] = vision[theirs[0]].unsqueeze(0)
        else:
            out[ours] = vision[theirs[0]]
    return {"visual." + k: v for k, v in out.items()}


# --- preprocessing -------------------------------------------------------------------------


def image_processor_to_hf(encoder: OpenCLIPEncoder) -> dict[str, Any]:
    """CLIPImageProcessor arguments that preprocess as the encoder does (its `resize_mode` must be
    shortest or squash, its interpolation bicubic or bilinear: `describe_tower` checks both)."""
    size = encoder.image_size
    config: dict[str, Any] = {
        "do_convert_rgb": True,  # as ours: convert first, then resize
        "do_resize": True,
        "resample": _RESAMPLE[encoder.interpolation],
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(encoder.mean),
        "image_std": list(encoder.std),
    }
    if encoder.resize_mode == "shortest":
        config.update(size={"shortest_edge": size}, do_center_crop=True)
    else:  # squash
        config.update(size={"height": size, "width": size}, do_center_crop=False)
    return config


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def read_image_processor_config(directory: str | Path) -> dict[str, Any]:
    """The image processor settings of a Hugging Face model directory: nested in
    `processor_config.json` (transformers 5) or in `preprocessor_config.json`; FileNotFoundError
    when neither holds them."""
    directory = Path(directory)
    nested = _load_json(directory / "processor_config.json").get("image_processor")
    config = nested if isinstance(nested, dict) else _load_json(directory / "preprocessor_config.json")
    if not config:
        raise FileNotFoundError(f"{directory} has no image processor config (processor_config.json or "
                                "preprocessor_config.json)")
    return config


def _preprocess_from_hf(processor: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """Our preprocess_cfg from a CLIP / SigLIP image-processor config, or ValueError."""
    kind = processor.get("image_processor_type", "")
    # LLaVA-OneVision's processor: its tiling belongs to the model's layout (multimodal.layouts), each
    # view is a direct resize to the tower's size with its mean and std.
    supported = ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaOnevisionImageProcessor")
    if not kind.removesuffix("Fast").removesuffix("Pil") in supported:
        raise ValueError(f"image processor {kind!r}: only {', '.join(supported)} are supported")
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if not processor.get(flag, True):
            raise ValueError(f"image processor option {flag}=False has no equivalent in our preprocessing")
    if not math.isclose(processor.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-6):
        raise ValueError(f"image processor rescale_factor {processor['rescale_factor']}: only 1/255 is supported")
    resample = processor.get("resample", 3)
    if resample not in _RESAMPLE_NAMES:
        raise ValueError(f"image processor resample={resample}: only bilinear (2) and bicubic (3) are supported")
    size = processor.get("size") or {}
    crop = processor.get("crop_size") or {}
    do_crop = processor.get("do_center_crop", kind.startswith("CLIP"))
    if "shortest_edge" in size and do_crop and size["shortest_edge"] == image_size \
            and crop == {"height": image_size, "width": image_size}:
        mode = "shortest"
    elif size == {"height": image_size, "width": image_size} and (
            not do_crop or crop == {"height": image_size, "width": image_size}):
        mode = "squash"
    else:
        raise ValueError(f"image processor size {size} / crop_size {crop} (do_center_crop={do_crop}) for a "
                         f"{image_size} px tower: only shortest-edge resize + centre crop and direct resize are supported")
    return {
        "mean": [float(v) for v in processor["image_mean"]],
        "std": [float(v) for v in processor["image_std"]],
        "interpolation": _RESAMPLE_NAMES[resample],
        "resize_mode": mode,
    }


# --- the open_clip tower of a Hugging Face one ---------------------------------------------


def encoder_config_from_hf(
    tower: HFVisionTower, image_processor: Mapping[str, Any], feature_layer: int, drop_cls: bool,
    timm_model_name: str | None = None,
) -> dict[str, Any]:
    """`OpenCLIPEncoder` arguments (model_name, feature_layer, drop_cls, preprocess_cfg) for
    `tower` read at `feature_layer` (counted in `tower`), preprocessing as `image_processor` does.

    A CLIP tower becomes an open_clip vision_cfg. A SigLIP tower is described to open_clip by a
    registered timm model of the same architecture: `timm_model_name`, or the first `*siglip*`
    model timm lists that matches (one whose own activation is the tower's first, then one that
    differs only in the activation); when that model is deeper than `tower`, the feature layer is
    counted from its input instead.

    The activation: `gelu_pytorch_tanh` on a CLIP tower, or on a SigLIP tower whose timm model
    computes another GELU (timm's `vit_so400m_patch14_siglip_384` is exact, while Google's and
    Hugging Face's SigLIP use the tanh approximation), sets `activation="gelu_tanh"`; likewise
    `gelu` on a timm model with a tanh GELU sets `activation="gelu"`. Otherwise the key is absent
    (the tower's own activation is the one). ValueError for what has no equivalent."""
    preprocess = _preprocess_from_hf(image_processor, tower.image_size)
    hidden, heads = tower.hidden_size, tower.num_heads
    if tower.kind == "clip":
        # open_clip sizes the MLP as int(width * mlp_ratio); nudge the ratio past float rounding.
        mlp_ratio = tower.intermediate_size / hidden
        if int(hidden * mlp_ratio) != tower.intermediate_size:
            mlp_ratio = (tower.intermediate_size + 0.5) / hidden
        if int(hidden * mlp_ratio) != tower.intermediate_size or hidden % heads:
            raise ValueError(f"CLIP tower width {hidden}, heads {heads}, intermediate {tower.intermediate_size}: "
                             "not expressible as an open_clip vision_cfg")
        vision = {"image_size": tower.image_size, "layers": tower.num_layers, "width": hidden,
                  "head_width": hidden // heads, "mlp_ratio": mlp_ratio, "patch_size": tower.patch_size}
        if not math.isclose(tower.layer_norm_eps, 1e-5):
            vision["norm_kwargs"] = {"eps": tower.layer_norm_eps}
        model_name: dict[str, Any] = {"embed_dim": hidden, "vision_cfg": vision,
                                      "quick_gelu": tower.hidden_act == "quick_gelu"}
        activation = "gelu_tanh" if tower.hidden_act == "gelu_pytorch_tanh" else None  # open_clip's is nn.GELU
    else:
        # The feature layer counts in the (possibly truncated) tower; the timm model may be deeper.
        blocks_needed = feature_layer % (tower.num_layers + 1)
        name, depth, activation = _timm_siglip_model(tower, timm_model_name, blocks_needed)
        if depth != tower.num_layers:
            feature_layer = blocks_needed
        model_name = {"embed_dim": hidden, "vision_cfg": {
            "image_size": tower.image_size, "timm_model_name": name, "timm_model_pretrained": False,
            "timm_pool": "", "timm_proj": "none"}}
    config = {"model_name": model_name, "feature_layer": feature_layer, "drop_cls": drop_cls,
              "preprocess_cfg": preprocess}
    if activation is not None:
        config["activation"] = activation
    return config


def _timm_siglip_model(
    tower: HFVisionTower, requested: str | None, blocks_needed: int
) -> tuple[str, int, str | None]:
    """(name, depth, activation) of a registered timm model whose architecture is `tower`'s, with
    at least `blocks_needed` blocks (open_clip builds SigLIP towers from a timm model name alone, so
    the architecture must be one timm knows by name). activation is None when the timm model's own
    MLP activation is the tower's, else the encoder `activation` option that makes it so; a model
    whose activation differs is taken only when no model matches outright and the option exists."""
    import timm
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block

    depth: dict[str, int] = {}
    act_only: dict[str, str | None] = {}  # models that differ in nothing but the activation
    option = _ENCODER_ACTIVATION.get(tower.hidden_act)  # the encoder option computing the tower's

    def matches(name: str) -> bool:
        try:
            with torch.device("meta"):
                trunk = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        except Exception:  # noqa: BLE001 - a model that cannot be built this way is simply not a match
            return False
        blocks = list(getattr(trunk, "blocks", []))
        if len(blocks) < max(blocks_needed, 1) or getattr(trunk, "num_prefix_tokens", None) != 0:
            return False
        if getattr(trunk, "embed_dim", None) != tower.hidden_size or getattr(trunk, "dynamic_img_size", False):
            return False
        if tuple(trunk.patch_embed.img_size) != (tower.image_size,) * 2:
            return False
        if tuple(trunk.patch_embed.patch_size) != (tower.patch_size,) * 2:
            return False
        if any(type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp for b in blocks):
            return False
        # The same tensors as the HF SigLIP layout (no pre-norm, qk-norm, layer scale; biases present).
        wanted = {k.removeprefix("trunk.") for k, _, _ in _vision_pairs("siglip", blocks_needed)}
        have = {k for k in trunk.state_dict() if not k.startswith("blocks.") or int(k.split(".")[1]) < blocks_needed}
        have = {k for k in have if not k.startswith(("norm.", "fc_norm.", "attn_pool.", "head."))}
        block = blocks[0]
        if have != wanted or block.attn.num_heads != tower.num_heads:
            return False
        if block.mlp.fc1.out_features != tower.intermediate_size:
            return False
        if not isinstance(block.norm1, nn.LayerNorm) or not math.isclose(block.norm1.eps, tower.layer_norm_eps):
            return False
        depth[name] = len(blocks)
        act = _activation_name(block.mlp.act)
        if act != tower.hidden_act:
            act_only[name] = act
            return False
        return True

    if requested is not None:
        if matches(requested):
            return requested, depth[requested], None
        if requested in act_only and option is not None:
            return requested, depth[requested], option
        why = (f"its activation is {act_only[requested]!r}, not {tower.hidden_act!r}, which the encoder's "
               f"activation option cannot make ({sorted(_ENCODER_ACTIVATION)})" if requested in act_only
               else f"it does not have the SigLIP tower's architecture {tower}")
        raise ValueError(f"timm model {requested!r}: {why}")
    for name in timm.list_models("*siglip*"):
        # Skip, without building them, models whose name or default config rules them out.
        patch = re.search(r"patch(\d+)", name)
        default = timm.models.get_pretrained_cfg(name)
        size = (getattr(default, "input_size", None) or (None,))[-1] if default is not None else None
        if (patch and int(patch.group(1)) != tower.patch_size) or (size is not None and size != tower.image_size):
            continue
        if matches(name):
            return name, depth[name], None
    if act_only and option is not None:
        name = next(iter(act_only))  # the first in timm's order, as above
        return name, depth[name], option
    near = "".join(f"; timm's {name!r} matches except that its activation is {act!r}, not {tower.hidden_act!r} "
                   f"(the features would differ; the encoder's activation option computes only "
                   f"{sorted(_ENCODER_ACTIVATION)})" for name, act in act_only.items())
    raise ValueError(
        f"no registered timm model has this SigLIP tower's architecture ({tower}){near}. open_clip builds SigLIP "
        "towers from a timm model name: register one with that architecture (timm.models.register_model) and "
        "pass its name as timm_model_name"
    )
