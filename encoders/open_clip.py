"""An open_clip vision tower as a VLM image encoder: pixels [N, 3, S, S] -> tokens [N, T, D].

Two tower families are supported, the ones LLaVA-style models use:
- open_clip's own VisionTransformer (OpenAI CLIP, LAION/DataComp/DFN/MetaCLIP ViTs);
- timm VisionTransformers wrapped by open_clip's TimmModel: every SigLIP and SigLIP2 config in
  open_clip (`ViT-B-16-SigLIP`, `ViT-SO400M-14-SigLIP-384`, `ViT-*-SigLIP2-*`, ...) is of this kind.

Features follow Hugging Face's `hidden_states` indexing, so `feature_layer=-2` means what it means
in LLaVA-1.5: index into [block input (after patch/class/position embedding and the pre-norm),
output of block 1, ..., output of block L]; no final norm is applied.

`activation` replaces the MLP activation of every block after the tower is built: timm's
`vit_so400m_patch14_siglip_384` (open_clip's `ViT-SO400M-14-SigLIP-384`) uses exact erf GELU,
while Google's SigLIP, Hugging Face's (`gelu_pytorch_tanh`) and LLaVA-OneVision use the tanh
approximation; open_clip cannot select it from a model config.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch
from open_clip.transform import PreprocessCfg
from open_clip.transformer import VisionTransformer as OpenCLIPVisionTransformer
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

try:
    # open_clip's own vision-tower builder: the tower is constructed exactly as inside
    # open_clip.CLIP (same classes, activations, norms), without ever building the text tower.
    from open_clip.model import _build_vision_tower
except ImportError as error:  # pragma: no cover - depends on the installed open_clip
    raise ImportError(
        "encoders.OpenCLIPEncoder needs open_clip.model._build_vision_tower (open_clip_torch>=2.26)"
    ) from error

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
ACTIVATIONS = ("gelu", "gelu_tanh")  # values of OpenCLIPEncoder's `activation` besides None


class OpenCLIPEncoder(nn.Module):
    """open_clip vision tower truncated at `feature_layer`.

    Args:
        model_name: a name from `open_clip.list_models()`, or an open_clip model config as a dict
            (`{"embed_dim": ..., "vision_cfg": {...}, "quick_gelu": ...}`; `text_cfg` is ignored).
        pretrained: None (random init), an open_clip pretrained tag for `model_name` (downloaded by
            open_clip; never used in tests), or a local `.safetensors` / `.bin` / `.pt` / `.pth`
            file holding an open_clip checkpoint (text keys are ignored).
        feature_layer: index into Hugging Face-style hidden states (see module docstring).
        drop_cls: drop the class / register tokens (CLIP has one; SigLIP has none).
        preprocess_cfg: overrides for the preprocessing settings (keys of open_clip's
            PreprocessCfg: mean, std, interpolation, resize_mode, fill_color). Needed for a dict
            config, which carries none; `config()` records the resolved values.
        activation: the MLP activation of every block: None keeps the tower's own (open_clip's
            nn.GELU or QuickGELU, the timm model's act_layer), "gelu" is exact (erf) GELU,
            "gelu_tanh" its tanh approximation (timm's GELUTanh, Hugging Face's
            `gelu_pytorch_tanh`). It has no parameters, so any checkpoint of the tower loads.

    `self.visual` is open_clip's module, so state-dict keys are open_clip's `visual.*` names.
    Its forward() is not usable: everything that cannot affect our output has been removed.
    """

    def __init__(
        self,
        model_name: str | Mapping[str, Any],
        pretrained: str | os.PathLike | None = None,
        feature_layer: int = -2,
        drop_cls: bool = True,
        preprocess_cfg: Mapping[str, Any] | None = None,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
            raise ValueError(f"feature_layer must be an int, got {feature_layer!r}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None (the tower's own), 'gelu' (exact erf) or 'gelu_tanh' "
                             f"(tanh approximation), got {activation!r}")
        model_cfg, registry_name = _resolve_model_config(model_name)

        checkpoint_path, tag_cfg = None, {}
        if pretrained is not None:
            checkpoint_path, tag_cfg = _resolve_pretrained(registry_name, pretrained)
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
        if tag_cfg.get("quick_gelu", False) and not quick_gelu:
            # The tag's weights were trained with QuickGELU (OpenAI CLIP); open_clip only warns and
            # builds nn.GELU, which silently changes every feature. Follow the weights instead.
            quick_gelu = True
            model_cfg["quick_gelu"] = True
            registry_name = None  # the architecture now differs from the named config

        try:
            visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu)
        except TypeError as error:
            raise ValueError(f"invalid open_clip vision_cfg {model_cfg['vision_cfg']}: {error}") from error

        if isinstance(visual, OpenCLIPVisionTransformer):
            self.tower_type = "open_clip"
            blocks = visual.transformer.resblocks
            image_size, patch_size = visual.image_size, visual.patch_size
            num_patches = visual.grid_size[0] * visual.grid_size[1]
            self.num_prefix_tokens = 1  # open_clip's ViT always has exactly one class token
            self.hidden_size = visual.transformer.width
        elif isinstance(getattr(visual, "trunk", None), TimmVisionTransformer):
            self.tower_type = "timm"
            trunk = visual.trunk
            blocks = trunk.blocks
            image_size, patch_size = trunk.patch_embed.img_size, trunk.patch_embed.patch_size
            configured = _pair(model_cfg["vision_cfg"].get("image_size", 224))
            if tuple(image_size) != configured:
                # open_clip does not pass image_size to timm, so the two can silently disagree.
                raise ValueError(
                    f"vision_cfg image_size {configured} differs from the timm model "
                    f"{model_cfg['vision_cfg']['timm_model_name']!r} input size {tuple(image_size)}; "
                    "set image_size to the timm model's size"
                )
            num_patches = trunk.patch_embed.num_patches
            self.num_prefix_tokens = trunk.num_prefix_tokens
            self.hidden_size = trunk.embed_dim
        else:
            inner = getattr(visual, "trunk", visual)
            raise ValueError(
                f"unsupported vision tower {type(inner).__name__}: OpenCLIPEncoder supports open_clip's "
                "VisionTransformer and timm VisionTransformer towers (CLIP ViTs, SigLIP, SigLIP2)"
            )
        if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
            raise ValueError(f"only square towers are supported, got image {image_size}, patch {patch_size}")

        if activation is not None:
            _set_activation(visual, self.tower_type, activation)
        self.activation = activation

        self.num_layers_total = len(blocks)
        if not -(self.num_layers_total + 1) <= feature_layer <= self.num_layers_total:
            raise ValueError(
                f"feature_layer={feature_layer} is out of range for a tower with {self.num_layers_total} "
                f"blocks: use {-(self.num_layers_total + 1)}..{self.num_layers_total} (0 = block input after "
                "the embeddings, -1 = last block output, -2 = penultimate)"
            )
        self.num_layers = feature_layer % (self.num_layers_total + 1)  # blocks that run

        self.feature_layer = feature_layer
        self.drop_cls = bool(drop_cls)
        # Recompute each block's activations in backward instead of keeping them (a training
        # setting, not part of the architecture: not in config()).
        self.gradient_checkpointing = False
        self.image_size = int(image_size[0])
        self.patch_size = int(patch_size[0])
        self.num_tokens = num_patches + (0 if self.drop_cls else self.num_prefix_tokens)

        preprocess = _resolve_preprocess_cfg(registry_name, tag_cfg, preprocess_cfg, self.image_size)
        self.mean: tuple[float, float, float] = preprocess["mean"]
        self.std: tuple[float, float, float] = preprocess["std"]
        self.interpolation: str = preprocess["interpolation"]
        self.resize_mode: str = preprocess["resize_mode"]
        self.fill_color: int = preprocess["fill_color"]
        self._model_name = _config_model_name(model_cfg, registry_name)

        full_shapes = {name: tuple(t.shape) for name, t in visual.state_dict().items()}
        _truncate(visual, self.tower_type, self.num_layers)
        self.visual = visual
        if checkpoint_path is not None:
            self._load_visual_weights(checkpoint_path, full_shapes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] (normalized, see encoders.encoder_transform) -> [N, num_tokens, hidden_size]."""
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(
                f"expected pixels of shape [N, 3, {size}, {size}], got {list(pixels.shape)}; "
                "preprocess images with encoders.encoder_transform(encoder)"
            )
        if not pixels.is_floating_point():
            raise ValueError(f"expected normalized float pixels, got dtype {pixels.dtype}")
        # The data pipeline yields float32; the tower may have been cast to bf16/fp16.
        pixels = pixels.to(self._input_dtype())
        hidden = self._embed_clip(pixels) if self.tower_type == "open_clip" else self._embed_timm(pixels)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Each block is called as a module (its hooks fire: a sharded block gathers its weights).
            hidden = checkpoint(block, hidden, use_reentrant=False) if recompute else block(hidden)
        if self.drop_cls:
            hidden = hidden[:, self.num_prefix_tokens:]
        return hidden

    @property
    def blocks(self) -> nn.Sequential | nn.ModuleList:
        """The transformer blocks that run (those up to the feature layer), in order."""
        return self.visual.transformer.resblocks if self.tower_type == "open_clip" else self.visual.trunk.blocks

    def config(self) -> dict[str, Any]:
        """JSON-serializable arguments that rebuild this architecture: OpenCLIPEncoder(**config()).

        `activation` is present only when set, so a tower with its own activation saves the same
        config as before the option existed (and such configs load as before)."""
        config: dict[str, Any] = {
            "model_name": copy.deepcopy(self._model_name),
            "feature_layer": self.feature_layer,
            "drop_cls": self.drop_cls,
            "preprocess_cfg": {
                "mean": list(self.mean),
                "std": list(self.std),
                "interpolation": self.interpolation,
                "resize_mode": self.resize_mode,
                "fill_color": self.fill_color,
            },
        }
        if self.activation is not None:
            config["activation"] = self.activation
        return config

    def _input_dtype(self) -> torch.dtype:
        conv = self.visual.conv1 if self.tower_type == "open_clip" else self.visual.trunk.patch_embed.proj
        return conv.weight.dtype

    def _embed_clip(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [N, grid*grid, D]
        cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(patches.shape[0], -1, -1)
        hidden = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
        # Patch dropout is left out on purpose: it would change the token count per image, which the
        # projector and the <image> placeholder expansion rely on.
        return visual.ln_pre(hidden)

    def _embed_timm(self, pixels: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        hidden = trunk.patch_embed(pixels)
        # timm keeps prefix tokens and every position-embedding variant (class token inside or
        # outside the table, register tokens, dynamic size) in this one method; re-deriving it here
        # would fork that logic. Patch dropout is skipped for the reason given in _embed_clip.
        hidden = trunk._pos_embed(hidden)
        return trunk.norm_pre(hidden)

    def _load_visual_weights(self, path: str, full_shapes: dict[str, tuple[int, ...]]) -> None:
        state = load_visual_state_dict(path)
        kept = self.visual.state_dict()
        unexpected = sorted(k for k in state if k not in full_shapes)
        missing = sorted(k for k in kept if k not in state)
        mismatched = sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {full_shapes[k]}"
            for k in state
            if k in full_shapes and tuple(state[k].shape) != full_shapes[k]
        )
        if unexpected or missing or mismatched:
            problems = []
            for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
                if names:
                    shown = ", ".join(f"visual.{n}" for n in names[:12])
                    more = f" (+{len(names) - 12} more)" if len(names) > 12 else ""
                    problems.append(f"{label} keys: {shown}{more}")
            raise ValueError(
                f"{path} does not match the vision tower of {_describe(self._model_name)}: " + "; ".join(problems)
            )
        # Weights of the removed blocks / head are expected in a full checkpoint and simply dropped.
        self.visual.load_state_dict({k: state[k] for k in kept}, strict=True)


def load_visual_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of an open_clip checkpoint file, with the `visual.` prefix removed.

    Accepts `.safetensors`, and `.bin` / `.pt` / `.pth` read with torch.load(weights_only=True)
    (tensors and plain containers only, never arbitrary pickled objects). Unwraps a `state_dict`
    entry and DDP's `module.` prefix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint: Any = load_file(str(path), device="cpu")
    elif suffix in _TORCH_SUFFIXES:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{path} could not be read with torch.load(weights_only=True) ({error}); "
                "only plain state dicts are accepted, save one with torch.save(model.state_dict(), path)"
            ) from error
    else:
        raise ValueError(f"{path}: unsupported weights file type {suffix!r}; use .safetensors, .bin, .pt or .pth")

    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    visual = {}
    for key, value in checkpoint.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("visual.") and isinstance(value, torch.Tensor):
            visual[key[len("visual."):]] = value
    if not visual:
        sample = ", ".join(list(checkpoint)[:5])
        raise ValueError(f"{path} has no 'visual.*' keys (first keys: {sample}); expected an open_clip checkpoint")
    return visual


def _resolve_model_config(model_name: str | Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(model config with embed_dim / vision_cfg / quick_gelu, registry name or None)."""
    if isinstance(model_name, Mapping):
        cfg = copy.deepcopy(dict(model_name))
        if "vision_cfg" not in cfg or "embed_dim" not in cfg:
            raise ValueError(
                "a model config dict needs 'embed_dim' and 'vision_cfg' (open_clip's model-config JSON format), "
                f"got keys {sorted(cfg)}"
            )
        return cfg, None
    if not isinstance(model_name, str):
        raise ValueError(f"model_name must be an open_clip model name or config dict, got {type(model_name).__name__}")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        # open_clip would fetch or read a config elsewhere; keep resolution local and explicit.
        raise ValueError(
            f"{model_name!r}: schema names are not supported; pass the 'model_cfg' of its open_clip_config.json "
            "as a dict (and its 'preprocess_cfg' as preprocess_cfg) and the weights file as pretrained"
        )
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        hint = f"; close matches: {close}" if close else ""
        raise ValueError(f"unknown open_clip model {model_name!r} (see open_clip.list_models()){hint}")
    return cfg, model_name


def _resolve_pretrained(registry_name: str | None, pretrained: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(local checkpoint path, pretrained-tag config or {})."""
    if os.path.isfile(pretrained):
        return str(pretrained), {}
    pretrained = str(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(registry_name) if registry_name else []
    tag_cfg = open_clip.get_pretrained_cfg(registry_name, pretrained) if registry_name else {}
    if not tag_cfg:
        where = f"open_clip tags for {registry_name!r}: {tags}" if registry_name else "a dict config has no tags"
        raise ValueError(f"pretrained={pretrained!r} is neither an existing file nor a known tag ({where})")
    # Only reached when the caller asks for a tag: this is the one network path (open_clip's cache).
    path = open_clip.download_pretrained(tag_cfg)
    if not path:
        raise ValueError(f"open_clip has no download location for {registry_name!r} tag {pretrained!r}")
    return path, tag_cfg


def _resolve_preprocess_cfg(
    registry_name: str | None,
    tag_cfg: Mapping[str, Any],
    overrides: Mapping[str, Any] | None,
    image_size: int,
) -> dict[str, Any]:
    """open_clip's defaults <- the weights' preprocessing <- explicit overrides."""
    defaults = asdict(PreprocessCfg())
    cfg = {key: defaults[key] for key in _PREPROCESS_KEYS}
    source: Mapping[str, Any] = tag_cfg
    if not source and registry_name:
        # Without a tag, open_clip itself falls back to OpenAI's mean/std even for SigLIP. The
        # weights that exist for this architecture know better: use their settings when they agree.
        candidates = [open_clip.get_pretrained_cfg(registry_name, tag)
                      for tag in open_clip.list_pretrained_tags_by_model(registry_name)]
        settings = {json.dumps({k: c.get(k) for k in _PREPROCESS_KEYS}, sort_keys=True) for c in candidates}
        if len(settings) == 1:
            source = candidates[0]
        elif len(settings) > 1:
            warnings.warn(
                f"open_clip's pretrained tags for {registry_name!r} disagree on preprocessing; using open_clip's "
                "defaults. Pass pretrained=<tag> or preprocess_cfg to choose.",
                stacklevel=3,
            )
    for layer in (source, overrides or {}):
        for key, value in layer.items():
            if key in _PREPROCESS_KEYS and value is not None:
                cfg[key] = value
    unknown = sorted(set(overrides or {}) - set(_PREPROCESS_KEYS) - {"size", "mode"})
    if unknown:
        raise ValueError(f"unknown preprocess_cfg keys {unknown}; allowed: {list(_PREPROCESS_KEYS)}")
    if overrides and overrides.get("size") not in (None, image_size, [image_size] * 2, (image_size,) * 2):
        raise ValueError(f"preprocess_cfg size {overrides['size']} differs from the tower's image size {image_size}")
    if overrides and overrides.get("mode", "RGB") != "RGB":
        raise ValueError(f"preprocess_cfg mode must be 'RGB', got {overrides['mode']!r}")

    for key in ("mean", "std"):
        value = cfg[key]
        value = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
        if len(value) != 3:
            raise ValueError(f"preprocess {key} needs 3 values, got {value}")
        cfg[key] = tuple(float(v) for v in value)
    if cfg["interpolation"] == "random":
        cfg["interpolation"] = "bicubic"  # open_clip's inference transform does the same
    if cfg["interpolation"] not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {cfg['interpolation']!r}")
    if cfg["resize_mode"] not in ("shortest", "longest", "squash"):
        raise ValueError(f"resize_mode must be shortest, longest or squash, got {cfg['resize_mode']!r}")
    cfg["fill_color"] = int(cfg["fill_color"])
    return cfg


def _truncate(visual: nn.Module, tower_type: str, num_layers: int) -> None:
    """Remove every module that can never influence the features at `num_layers`.

    The blocks after the feature layer, the final norm, the pooling (class token / attention pool /
    MAP head) and the projection. This saves memory and compute, and under DDP parameters that get
    no gradient would otherwise raise "parameters that were not used in producing loss".
    """
    if tower_type == "open_clip":
        visual.transformer.resblocks = visual.transformer.resblocks[:num_layers]
        visual.ln_post = nn.Identity()
        visual.proj = None
        visual.attn_pool = None
        visual.attn_pool_contrastive = None
    else:
        trunk = visual.trunk
        trunk.blocks = trunk.blocks[:num_layers]
        trunk.norm = nn.Identity()
        trunk.fc_norm = nn.Identity()
        trunk.attn_pool = None
        trunk.head = nn.Identity()
        visual.head = nn.Identity()


def _set_activation(visual: nn.Module, tower_type: str, activation: str) -> None:
    """Replace the MLP activation of every block (and of a timm attention pool's MLP)."""
    if tower_type == "open_clip":
        # open_clip's (Custom)ResidualAttentionBlock: mlp = Sequential(c_fc, gelu, [ln,] c_proj).
        for block in visual.transformer.resblocks:
            block.mlp.gelu = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        return
    from timm.layers import GELUTanh

    trunk = visual.trunk
    mlps = [(f"block {i}", block.mlp) for i, block in enumerate(trunk.blocks)]
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None and hasattr(pool, "mlp"):
        mlps.append(("the attention pool", pool.mlp))
    for where, mlp in mlps:
        if not isinstance(getattr(mlp, "act", None), nn.Module):
            raise ValueError(f"activation={activation!r}: the MLP of {where} ({type(mlp).__name__}) has no `act` "
                             "module to replace")
        mlp.act = GELUTanh() if activation == "gelu_tanh" else nn.GELU()


def _config_model_name(model_cfg: Mapping[str, Any], registry_name: str | None) -> str | dict[str, Any]:
    if registry_name is not None:
        return registry_name
    # A dict survives a JSON round trip only if it is JSON data; text_cfg is dropped as unused.
    vision_only = {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "quick_gelu")}
    return json.loads(json.dumps(vision_only))


def _describe(model_name: str | Mapping[str, Any]) -> str:
    if isinstance(model_name, str):
        return repr(model_name)
    vision = model_name.get("vision_cfg", {})
    return f"config {vision.get('timm_model_name') or {k: vision.get(k) for k in ('width', 'layers', 'patch_size')}}"


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]
