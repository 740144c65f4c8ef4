"""Hugging Face LLaVA export and import.

`export_hf_llava(model_or_checkpoint_dir, out_dir)` writes a directory that
`transformers.AutoProcessor.from_pretrained(out_dir)` and
`transformers.LlavaForConditionalGeneration.from_pretrained(out_dir)` load with no extra code:

- `config.json`: a LlavaConfig. The vision config (CLIPVisionConfig for open_clip's own ViTs,
  SiglipVisionConfig for timm SigLIP towers) is read off the tower's modules, activation and
  LayerNorm epsilon included, so the Hugging Face tower computes what open_clip's does;
- `model.safetensors` (sharded above 5 GB): the weights under the names llava-hf checkpoints use
  (`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`,
  `language_model.lm_head.weight`), which every transformers version reads;
- the processor: a CLIPImageProcessor with our resize, crop, interpolation, mean and std; the
  tokenizer with its chat template; and LlavaProcessor settings (image token = our placeholder
  token, patch size, feature select strategy, additional tokens) under which one image token in a
  prompt expands to exactly `model.num_image_tokens` placeholders;
- `generation_config.json`: greedy, stopping at `<|im_end|>` or `</s>` as our `generate` does.

Two facts about the layout:
- Our checkpoints keep only the vision blocks up to the feature layer (the rest cannot influence
  the output and is never stored). The exported tower is that truncated tower, so
  `vision_feature_layer` is -1 (its last hidden state), which selects the same features as our
  `feature_layer` did in the full tower. The tower's final LayerNorm, unused by LLaVA (it reads
  `hidden_states`, not the normed output), is written as an identity (ones, zeros).
- Hugging Face's default image processor backend in recent transformers is torchvision, whose
  antialiased resize may round a pixel one or two levels (of 255) away from Pillow's. Our
  preprocessing is Pillow's (bit-exact with open_clip); `AutoProcessor.from_pretrained(dir,
  backend="pil")` reproduces it bit for bit.

What the LLaVA layout cannot hold is refused before anything is written (see `check_exportable`):
pixel-shuffle projectors, MLP depths other than 2, the MLP projector's slot `positions`
embedding, the `longest` (pad) resize mode, and towers with parts Hugging Face's CLIP / SigLIP
vision models lack (layer scale, register or class tokens on a timm tower, a pre-norm on a SigLIP
tower, qk-norm, custom blocks, ...).

`import_hf_llava(hf_dir, out_dir)` reads a transformers LLaVA directory with a CLIP or SigLIP
vision tower, a Llama decoder and a Salamandra tokenizer into our `save_pretrained` format.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import projector as projectors
from encoders import OpenCLIPEncoder
from lm import Decoder
from lm.hf import INDEX_FILE, config_from_hf, config_to_hf, write_safetensors
from lm.hf import SINGLE_FILE as WEIGHTS_FILE
from lm.tokenizer import load_tokenizer
from multimodal.model import VisionLanguageModel

__all__ = ["check_exportable", "export_hf_llava", "import_hf_llava", "llava_chat_template"]

MAX_SHARD_BYTES = 5 * 2**30
VISION_PREFIX = "vision_tower.vision_model."
PROJECTOR_PREFIX = "multi_modal_projector."
LANGUAGE_PREFIX = "language_model."

# Pillow resampling filter numbers, as Hugging Face image processors store them.
_RESAMPLE = {"bilinear": 2, "bicubic": 3}
_RESAMPLE_NAMES = {number: name for name, number in _RESAMPLE.items()}


def llava_chat_template(image_token: str) -> str:
    """ChatML that also takes LLaVA-style content lists: every `{"type": "image"}` part becomes the
    image token and a newline, images first, then the text parts (LLaVA's convention, and what
    `VisionLanguageModel.caption` / `chat` send). A plain-string content is used as is."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}"
        "{{- '" + image_token + "\\n' -}}"
        "{%- endfor -%}"
        "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


# --- the tower description shared by export and import --------------------------------------


@dataclass(frozen=True)
class _Tower:
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


def _describe_tower(encoder: OpenCLIPEncoder, problems: list[str]) -> _Tower | None:
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
    tower = _Tower(kind, encoder.hidden_size, intermediate, len(blocks), heads, encoder.image_size,
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


def _vision_config(tower: _Tower) -> dict[str, Any]:
    config = {
        "model_type": "clip_vision_model" if tower.kind == "clip" else "siglip_vision_model",
        "hidden_size": tower.hidden_size,
        "intermediate_size": tower.intermediate_size,
        "num_hidden_layers": tower.num_layers,
        "num_attention_heads": tower.num_heads,
        "num_channels": 3,
        "image_size": tower.image_size,
        "patch_size": tower.patch_size,
        "hidden_act": tower.hidden_act,
        "layer_norm_eps": tower.layer_norm_eps,
        "attention_dropout": 0.0,
    }
    if tower.kind == "clip":
        config["projection_dim"] = tower.hidden_size  # CLIP's contrastive projection: not part of the tower
    else:
        config["vision_use_head"] = False  # the MAP pooling head: LLaVA uses the patch tokens
    return config


# --- export --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ExportPlan:
    tower: _Tower
    select_strategy: str
    additional_tokens: int


def check_exportable(model: VisionLanguageModel) -> _ExportPlan:
    """Everything `export_hf_llava` needs to know, or a ValueError listing every option the LLaVA
    layout cannot hold (nothing is written before this passes)."""
    problems: list[str] = []
    proj_config = model.projector.config()
    kind = proj_config.get("kind")
    if kind == "pixel_shuffle":
        problems.append(f"projector kind 'pixel_shuffle' (factor {proj_config.get('factor')}) merges image tokens; "
                        "LLaVA's projector maps each vision token to one text token (use projector kind 'mlp')")
    elif kind != "mlp":
        problems.append(f"projector kind {kind!r} has no LLaVA equivalent (use 'mlp' with depth 2)")
    else:
        if proj_config.get("depth") != 2:
            problems.append(
                f"projector option depth={proj_config.get('depth')}: LLaVA's projector is exactly linear-GELU-linear "
                "(mlp depth 2); a depth-1 ('linear') projector would need an invented identity layer and a "
                "non-standard activation, deeper ones have no place")
        if proj_config.get("positions"):
            problems.append(f"projector option positions={proj_config['positions']}: the learned per-slot position "
                            "embedding has no place in the LLaVA layout (train with positions=0 to export)")
    encoder = model.encoder
    if encoder.resize_mode == "longest":
        problems.append("preprocessing resize_mode 'longest' (fit and pad with fill_color) cannot be reproduced by "
                        "Hugging Face's CLIPImageProcessor; use 'shortest' (resize and centre crop) or 'squash'")
    if encoder.interpolation not in _RESAMPLE:
        problems.append(f"preprocessing interpolation {encoder.interpolation!r}: use bicubic or bilinear")
    tower = _describe_tower(encoder, problems)
    strategy, additional = "full", 0
    if tower is not None:
        if tower.kind == "clip":
            additional = 1  # the class token
            strategy = "default" if encoder.drop_cls else "full"
    if problems:
        raise ValueError("cannot export to the Hugging Face LLaVA format:\n- " + "\n- ".join(problems))
    assert tower is not None
    return _ExportPlan(tower, strategy, additional)


def _vision_state(encoder: OpenCLIPEncoder, tower: _Tower) -> dict[str, torch.Tensor]:
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
    # The final norm is never applied to the features LLaVA reads; an identity keeps the file complete.
    dtype = next(iter(state.values())).dtype
    out["post_layernorm.weight"] = torch.ones(tower.hidden_size, dtype=dtype)
    out["post_layernorm.bias"] = torch.zeros(tower.hidden_size, dtype=dtype)
    return {VISION_PREFIX + k: v for k, v in out.items()}


def _hf_state(model: VisionLanguageModel, plan: _ExportPlan) -> dict[str, torch.Tensor]:
    state = _vision_state(model.encoder, plan.tower)
    layers = model.projector.layers
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        state[f"{PROJECTOR_PREFIX}{name}.weight"] = layers[index].weight
        state[f"{PROJECTOR_PREFIX}{name}.bias"] = layers[index].bias
    for name, tensor in model.decoder.state_dict().items():
        state[LANGUAGE_PREFIX + name] = tensor
    if model.decoder.config.tie_embeddings:
        state.pop(LANGUAGE_PREFIX + "lm_head.weight")  # Hugging Face ties it on load
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _image_processor_config(encoder: OpenCLIPEncoder) -> dict[str, Any]:
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


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty directory; choose a new output directory")


def export_hf_llava(model_or_checkpoint_dir: VisionLanguageModel | str | Path, out_dir: str | Path) -> Path:
    """Write `model_or_checkpoint_dir` (a model, or a directory written by `save_pretrained`) as a
    Hugging Face LLaVA directory at `out_dir` (new or empty). Returns the directory.

    Raises ValueError, before writing anything, for what the LLaVA layout cannot hold."""
    from transformers import AutoTokenizer, GenerationConfig, LlavaProcessor
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers before the 5.x image-processor rework
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    if isinstance(model_or_checkpoint_dir, VisionLanguageModel):
        model = model_or_checkpoint_dir
    else:
        model = VisionLanguageModel.from_pretrained(model_or_checkpoint_dir)
    out_dir = Path(out_dir)
    plan = check_exportable(model)
    _check_out_dir(out_dir)
    tokenizer = model.tokenizer
    image_token = tokenizer.id_to_token(model.image_token_id)
    decoder_dtype = model.decoder.lm_head.weight.dtype

    text_config = config_to_hf(model.decoder.config, decoder_dtype)
    for key in ("architectures", "torch_dtype"):
        text_config.pop(key)
    text_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": _vision_config(plan.tower),
        "text_config": text_config,
        "image_token_index": model.image_token_id,
        "image_seq_length": model.num_image_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,  # the exported tower ends at our feature layer (module docstring)
        "vision_feature_select_strategy": plan.select_strategy,
        "tie_word_embeddings": model.decoder.config.tie_embeddings,
        "dtype": str(decoder_dtype).removeprefix("torch."),
    }
    state = _hf_state(model, plan)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(state, out_dir, MAX_SHARD_BYTES)
    GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=[tokenizer.im_end_id, tokenizer.eos_id],
        pad_token_id=tokenizer.pad_id, do_sample=False,
    ).save_pretrained(out_dir)

    # The tokenizer and processor files are written by transformers itself, so they are in the
    # layout the installed transformers reads.
    tokenizer.save(out_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**_image_processor_config(model.encoder)),
        tokenizer=hf_tokenizer,
        patch_size=plan.tower.patch_size,
        vision_feature_select_strategy=plan.select_strategy,
        chat_template=llava_chat_template(image_token),
        image_token=image_token,
        num_additional_image_tokens=plan.additional_tokens,
    )
    processor.save_pretrained(out_dir)
    # transformers 5 nests the image processor in processor_config.json; 4.x reads this file.
    image_processor = json.loads((out_dir / "processor_config.json").read_text())["image_processor"]
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
    # Our own tokenizer files (PreTrainedTokenizerFast, BOS added by tokenizer.json's post-processor)
    # load in every transformers version; the re-saved ones name a class only transformers 5 knows.
    tokenizer.save(out_dir)
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["processor_class"] = "LlavaProcessor"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")
    return out_dir


# --- import --------------------------------------------------------------------------------


def _read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / INDEX_FILE
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    else:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {pickled}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{directory} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _split_hf_state(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
    """(vision, projector, decoder) tensors under their component-local names, from either the
    llava-hf layout (`language_model.model.*`, `vision_tower.vision_model.*`) or the one
    transformers 5 uses in memory (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`)."""
    vision: dict[str, torch.Tensor] = {}
    proj: dict[str, torch.Tensor] = {}
    decoder: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in tensors.items():
        name = key
        if name.startswith("model.") and name.split(".")[1] in ("language_model", "vision_tower", "multi_modal_projector"):
            name = name[len("model."):]
        if name in ("lm_head.weight", "language_model.lm_head.weight"):
            decoder["lm_head.weight"] = tensor
        elif name.startswith(LANGUAGE_PREFIX):
            rest = name[len(LANGUAGE_PREFIX):]
            decoder[rest if rest.startswith("model.") else "model." + rest] = tensor
        elif name.startswith("vision_tower."):
            vision[name[len("vision_tower."):].removeprefix("vision_model.")] = tensor
        elif name.startswith(PROJECTOR_PREFIX):
            proj[name[len(PROJECTOR_PREFIX):]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected tensors in the LLaVA checkpoint: {unknown[:8]}")
    return vision, proj, decoder


def _preprocess_from_hf(processor: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """Our preprocess_cfg from a CLIP / SigLIP image-processor config, or ValueError."""
    kind = processor.get("image_processor_type", "")
    if not kind.removesuffix("Fast").removesuffix("Pil") in ("CLIPImageProcessor", "SiglipImageProcessor"):
        raise ValueError(f"image processor {kind!r}: only CLIPImageProcessor and SiglipImageProcessor are supported")
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


def _timm_siglip_name(tower: _Tower, requested: str | None, blocks_needed: int) -> tuple[str, int]:
    """(name, depth) of a registered timm model whose architecture is `tower`'s, with at least
    `blocks_needed` blocks (open_clip builds SigLIP towers from a timm model name alone, so the
    architecture must be one timm knows by name)."""
    import timm
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block

    depth: dict[str, int] = {}
    act_only: dict[str, str | None] = {}  # models that differ in nothing but the activation

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
        if not matches(requested):
            raise ValueError(f"timm model {requested!r} does not have the SigLIP tower's architecture {tower}")
        return requested, depth[requested]
    for name in timm.list_models("*siglip*"):
        # Skip, without building them, models whose name or default config rules them out.
        patch = re.search(r"patch(\d+)", name)
        default = timm.models.get_pretrained_cfg(name)
        size = (getattr(default, "input_size", None) or (None,))[-1] if default is not None else None
        if (patch and int(patch.group(1)) != tower.patch_size) or (size is not None and size != tower.image_size):
            continue
        if matches(name):
            return name, depth[name]
    near = "".join(f"; timm's {name!r} matches except that its activation is {act!r}, not {tower.hidden_act!r} "
                   "(the features would differ)" for name, act in act_only.items())
    raise ValueError(
        f"no registered timm model has this SigLIP tower's architecture ({tower}){near}. open_clip builds SigLIP "
        "towers from a timm model name: register one with that architecture (timm.models.register_model) and "
        "pass its name as timm_model_name"
    )


def _reverse_vision(vision: Mapping[str, torch.Tensor], tower: _Tower, keep_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs, how in _vision_pairs(tower.kind, keep_layers):
        missing = [name for name in theirs if name not in vision]
        if missing:
            raise ValueError(f"the LLaVA checkpoint lacks vision tensors {missing}")
        if how == "qkv":
            out[ours] = torch.cat([vision[name] for name in theirs], dim=0)
        elif how == "pos":
            out[ours] = vision[theirs[0]].unsqueeze(0)
        else:
            out[ours] = vision[theirs[0]]
    return {"visual." + k: v for k, v in out.items()}


def import_hf_llava(hf_dir: str | Path, out_dir: str | Path, timm_model_name: str | None = None) -> Path:
    """Convert a transformers LLaVA directory (CLIP or SigLIP vision tower, Llama decoder, a
    Salamandra tokenizer) into our `save_pretrained` format at `out_dir` (new or empty).

    A SigLIP tower is described to open_clip by a registered timm model of the same architecture:
    `timm_model_name`, or the first `*siglip*` model timm lists that matches. Everything is checked
    before anything is written. Returns the directory."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "llava":
        raise ValueError(f"{config_path}: model_type {config.get('model_type')!r}, expected 'llava'")
    vision_cfg, text_cfg = config.get("vision_config") or {}, config.get("text_config") or {}
    kind = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(vision_cfg.get("model_type"))
    if kind is None:
        raise ValueError(f"vision tower {vision_cfg.get('model_type')!r}: only clip_vision_model and "
                         "siglip_vision_model have open_clip equivalents")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act {config['projector_hidden_act']!r}: our MLP projector uses exact GELU")
    feature_layer = config.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ValueError(f"vision_feature_layer {feature_layer}: several feature layers have no equivalent here")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full") or (kind == "siglip" and strategy == "default"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} on a {kind} tower: 'default' drops the "
                         "class token, which only CLIP towers have")
    hidden_act = vision_cfg.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
    if kind == "clip" and hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"CLIP tower hidden_act {hidden_act!r}: open_clip's ViT has gelu or quick_gelu")
    decoder_config = config_from_hf({**text_cfg, "tie_word_embeddings": bool(
        config.get("tie_word_embeddings") or text_cfg.get("tie_word_embeddings"))})

    hidden = vision_cfg.get("hidden_size", 768)
    heads = vision_cfg.get("num_attention_heads", 12)
    tower = _Tower(
        kind, hidden, vision_cfg.get("intermediate_size", 3072), vision_cfg.get("num_hidden_layers", 12), heads,
        int(vision_cfg.get("image_size", 224)), int(vision_cfg.get("patch_size", 16)), hidden_act,
        float(vision_cfg.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6)),
    )
    image_processor = _load_image_processor_config(hf_dir)
    preprocess = _preprocess_from_hf(image_processor, tower.image_size)
    if kind == "clip":
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
        model_name: dict[str, Any] = {"embed_dim": hidden, "vision_cfg": vision, "quick_gelu": hidden_act == "quick_gelu"}
    else:
        # HF's feature layer counts in its (possibly truncated) tower; the timm model may be deeper.
        blocks_needed = feature_layer % (tower.num_layers + 1)
        name, depth = _timm_siglip_name(tower, timm_model_name, blocks_needed)
        if depth != tower.num_layers:
            feature_layer = blocks_needed
        model_name = {"embed_dim": hidden, "vision_cfg": {
            "image_size": tower.image_size, "timm_model_name": name, "timm_model_pretrained": False,
            "timm_pool": "", "timm_proj": "none"}}
    encoder_config = {"model_name": model_name, "feature_layer": feature_layer,
                      "drop_cls": strategy == "default" or kind == "siglip", "preprocess_cfg": preprocess}

    tokenizer = load_tokenizer(hf_dir)
    # chat_template.jinja holds the processor's template in a LLaVA directory; the tokenizer's own
    # (text-only) template, when there is one, is the one to keep.
    tokenizer_config_path = hf_dir / "tokenizer_config.json"
    if tokenizer_config_path.exists():
        own = json.loads(tokenizer_config_path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(own, str):
            tokenizer.chat_template = own
    image_token_id = config.get("image_token_index", config.get("image_token_id"))
    if not isinstance(image_token_id, int):
        raise ValueError(f"{config_path} has no image_token_index")
    processor_config = _load_json(hf_dir / "processor_config.json")
    image_token = processor_config.get("image_token")
    if image_token is not None and tokenizer.backend.token_to_id(image_token) != image_token_id:
        raise ValueError(f"the processor's image token {image_token!r} is not id {image_token_id} "
                         "(the config's image_token_index)")

    with torch.device("meta"):
        encoder = OpenCLIPEncoder(**encoder_config)
        model = VisionLanguageModel(
            encoder, projectors.build("mlp", encoder.hidden_size, decoder_config.d_model, depth=2),
            Decoder(decoder_config), tokenizer, image_token_id,
        )
    patch = processor_config.get("patch_size", tower.patch_size)
    if processor_config:
        expected = (tower.image_size // patch) ** 2 + processor_config.get("num_additional_image_tokens", 0)
        expected -= 1 if processor_config.get("vision_feature_select_strategy", strategy) == "default" else 0
        if expected != model.num_image_tokens:
            raise ValueError(f"the processor expands an image to {expected} tokens but the model produces "
                             f"{model.num_image_tokens}; check patch_size / num_additional_image_tokens")

    vision, proj, decoder = _split_hf_state(_read_hf_tensors(hf_dir))
    state = _reverse_vision(vision, tower, encoder.num_layers)
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        weight = proj.get(f"{name}.weight")
        if weight is None:
            raise ValueError(f"the LLaVA checkpoint lacks multi_modal_projector.{name}.weight")
        state[f"projector.layers.{index}.weight"] = weight
        state[f"projector.layers.{index}.bias"] = proj.get(f"{name}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    state = {("encoder." + k if k.startswith("visual.") else k): v for k, v in state.items()}
    if decoder_config.tie_embeddings:
        decoder.pop("lm_head.weight", None)
        decoder["lm_head.weight"] = decoder.get("model.embed_tokens.weight")
    state.update({"decoder." + k: v for k, v in decoder.items() if not k.endswith("rotary_emb.inv_freq")})
    expected_state = model.state_dict()
    missing = sorted(set(expected_state) - set(state))
    unexpected = sorted(set(state) - set(expected_state))
    if missing or unexpected:
        raise ValueError(f"{hf_dir} does not match its config.json: missing {missing[:8]}, unexpected {unexpected[:8]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected_state[k].shape)}" for k, v in state.items()
             if v.shape != expected_state[k].shape]
    if wrong:
        raise ValueError(f"{hf_dir}: tensor shapes do not match config.json: {wrong[:8]}")
    _check_out_dir(out_dir)

    model.load_state_dict(state, assign=True)
    if decoder_config.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.model.embed_tokens.weight
    model.save_pretrained(out_dir)
    return out_dir


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _load_image_processor_config(hf_dir: Path) -> dict[str, Any]:
    nested = _load_json(hf_dir / "processor_config.json").get("image_processor")
    config = nested if isinstance(nested, dict) else _load_json(hf_dir / "preprocessor_config.json")
    if not config:
        raise FileNotFoundError(f"{hf_dir} has no image processor config (processor_config.json or "
                                "preprocessor_config.json)")
    return config
