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

This module knows the LLaVA layout only: the tower's side (its Hugging Face description, vision
config, weight names, image processor, the open_clip tower of an imported one) is
`encoders.hf`'s, the decoder's (Llama config, safetensors files) is `lm.hf`'s.
"""

from __future__ import annotations

import copy

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import projector as projectors
from encoders import OpenCLIPEncoder
from encoders.hf import (
    HFVisionTower, describe_tower, encoder_config_from_hf, image_processor_to_hf, read_image_processor_config,
    vision_state_from_hf, vision_state_to_hf,
)
from lm import Decoder
from lm.hf import config_from_hf, config_to_hf, read_safetensors, write_safetensors
from lm.tokenizer import Tokenizer, load_tokenizer
from multimodal.layouts import FIXED, ImageLayout
from multimodal.lora import merge_lora
from multimodal.model import VisionLanguageModel

__all__ = ["check_exportable", "export_hf_llava", "import_hf_llava", "llava_chat_template"]

MAX_SHARD_BYTES = 5 * 2**30
VISION_PREFIX = "vision_tower.vision_model."
PROJECTOR_PREFIX = "multi_modal_projector."
LANGUAGE_PREFIX = "language_model."


def llava_chat_template(image_token: str, video_token: str | None = None) -> str:
    """ChatML that also takes LLaVA-style content lists: every `{"type": "image"}` part becomes the
    image token and a newline, images first, then (with a `video_token`) every `{"type": "video"}`
    part, then the text parts (LLaVA's and OneVision's convention, and what
    `VisionLanguageModel.caption` / `chat` send). A plain-string content is used as is."""
    videos = "" if video_token is None else (
        "{%- for part in message['content'] if part['type'] == 'video' -%}"
        "{{- '" + video_token + "\\n' -}}"
        "{%- endfor -%}")
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}"
        "{{- '" + image_token + "\\n' -}}"
        "{%- endfor -%}"
        + videos +
        "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


# --- export --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ExportPlan:
    tower: HFVisionTower
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
    tower, encoder_problems = describe_tower(model.encoder)
    problems += encoder_problems
    strategy, additional = "full", 0
    if tower is not None:
        if tower.kind == "clip":
            additional = 1  # the class token
            strategy = "default" if model.encoder.drop_cls else "full"
    if problems:
        raise ValueError("cannot export to the Hugging Face LLaVA format:\n- " + "\n- ".join(problems))
    assert tower is not None
    return _ExportPlan(tower, strategy, additional)


def hf_llava_state(model: VisionLanguageModel, plan: _ExportPlan) -> dict[str, torch.Tensor]:
    state = {VISION_PREFIX + k: v for k, v in vision_state_to_hf(model.encoder, plan.tower).items()}
    layers = model.projector.layers
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        state[f"{PROJECTOR_PREFIX}{name}.weight"] = layers[index].weight
        state[f"{PROJECTOR_PREFIX}{name}.bias"] = layers[index].bias
    for name, tensor in model.decoder.state_dict().items():
        state[LANGUAGE_PREFIX + name] = tensor
    if model.decoder.config.tie_embeddings:
        state.pop(LANGUAGE_PREFIX + "lm_head.weight")  # Hugging Face ties it on load
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def model_to_export(model_or_checkpoint_dir: VisionLanguageModel | str | Path) -> VisionLanguageModel:
    """The model, loaded when given a directory; with LoRA adapters merged into its weights (a copy:
    the model given keeps its adapters), since Hugging Face's LLaVA classes have none."""
    if isinstance(model_or_checkpoint_dir, VisionLanguageModel):
        model = model_or_checkpoint_dir
        return merge_lora(copy.deepcopy(model)) if model.lora is not None else model
    model = VisionLanguageModel.from_pretrained(model_or_checkpoint_dir)
    return merge_lora(model) if model.lora is not None else model


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty directory; choose a new output directory")


def export_hf_llava(model_or_checkpoint_dir: VisionLanguageModel | str | Path, out_dir: str | Path) -> Path:
    """Write `model_or_checkpoint_dir` (a model, or a directory written by `save_pretrained`) as a
    Hugging Face LLaVA directory at `out_dir` (new or empty). Returns the directory.

    Raises ValueError, before writing anything, for what the LLaVA layout cannot hold."""
    from transformers import AutoTokenizer, LlavaProcessor
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers before the 5.x image-processor rework
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    model = model_to_export(model_or_checkpoint_dir)
    out_dir = Path(out_dir)
    plan = check_exportable(model)
    check_out_dir(out_dir)
    tokenizer = model.tokenizer
    image_token = tokenizer.id_to_token(model.image_token_id)
    decoder_dtype = model.decoder.lm_head.weight.dtype

    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": plan.tower.to_hf(),
        "text_config": llava_text_config(model),
        "image_token_index": model.image_token_id,
        "image_seq_length": model.num_image_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,  # the exported tower ends at our feature layer (module docstring)
        "vision_feature_select_strategy": plan.select_strategy,
        "tie_word_embeddings": model.decoder.config.tie_embeddings,
        "dtype": str(decoder_dtype).removeprefix("torch."),
    }
    write_model_files(out_dir, config, hf_llava_state(model, plan), tokenizer)

    # The tokenizer and processor files are written by transformers itself, so they are in the
    # layout the installed transformers reads.
    tokenizer.save(out_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**image_processor_to_hf(model.encoder)),
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
    write_own_tokenizer(out_dir, tokenizer, "LlavaProcessor")
    return out_dir


def llava_text_config(model: VisionLanguageModel) -> dict[str, Any]:
    """The decoder's Llama config as a LLaVA config's text_config, with the tokenizer's special ids."""
    tokenizer = model.tokenizer
    text_config = config_to_hf(model.decoder.config, model.decoder.lm_head.weight.dtype)
    for key in ("architectures", "torch_dtype"):
        text_config.pop(key)
    text_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return text_config


def write_model_files(out_dir: Path, config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    """config.json, the weights (sharded above 5 GB) and a generation config that decodes as ours:
    greedy, stopping at `<|im_end|>` or `</s>`."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(state, out_dir, MAX_SHARD_BYTES)
    GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=[tokenizer.im_end_id, tokenizer.eos_id],
        pad_token_id=tokenizer.pad_id, do_sample=False,
    ).save_pretrained(out_dir)


def write_own_tokenizer(out_dir: Path, tokenizer: Tokenizer, processor_class: str) -> None:
    """Our own tokenizer files (PreTrainedTokenizerFast, BOS added by tokenizer.json's post-processor)
    over those a processor's save_pretrained wrote: they load in every transformers version, the
    re-saved ones name a class only transformers 5 knows."""
    tokenizer.save(out_dir)
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["processor_class"] = processor_class
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")


# --- import --------------------------------------------------------------------------------


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
        elif name in ("image_newline", "model.image_newline"):  # LLaVA-OneVision's
            proj["image_newline"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected tensors in the LLaVA checkpoint: {unknown[:8]}")
    return vision, proj, decoder


def import_hf_llava(hf_dir: str | Path, out_dir: str | Path, timm_model_name: str | None = None,
                    model_type: str = "llava") -> Path:
    """Convert a transformers LLaVA directory (CLIP or SigLIP vision tower, Llama decoder, a
    Salamandra tokenizer) into our `save_pretrained` format at `out_dir` (new or empty).
    `model_type` "llava_onevision": a LLaVA-OneVision directory, imported in the anyres layout with
    its pinpoints, reduction threshold, newline embedding and video token.

    A SigLIP tower is described to open_clip by a registered timm model of the same architecture:
    `timm_model_name`, or the first `*siglip*` model timm lists that matches. Everything is checked
    before anything is written. Returns the directory."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != model_type:
        raise ValueError(f"{config_path}: model_type {config.get('model_type')!r}, expected {model_type!r}")
    onevision = model_type == "llava_onevision"
    vision_cfg, text_cfg = config.get("vision_config") or {}, config.get("text_config") or {}
    tower = HFVisionTower.from_hf(vision_cfg)
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act {config['projector_hidden_act']!r}: our MLP projector uses exact GELU")
    feature_layer = config.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ValueError(f"vision_feature_layer {feature_layer}: several feature layers have no equivalent here")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full") or (tower.kind == "siglip" and strategy == "default"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} on a {tower.kind} tower: 'default' drops the "
                         "class token, which only CLIP towers have")
    decoder_config = config_from_hf({**text_cfg, "tie_word_embeddings": bool(
        config.get("tie_word_embeddings") or text_cfg.get("tie_word_embeddings"))})
    encoder_config = encoder_config_from_hf(
        tower, read_image_processor_config(hf_dir), feature_layer,
        drop_cls=strategy == "default" or tower.kind == "siglip", timm_model_name=timm_model_name,
    )

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

    layout, video_token_id = FIXED, None
    if onevision:
        layout = ImageLayout.anyres(config.get("vision_aspect_ratio", "anyres_max_9"), config.get("image_grid_pinpoints"),
                                    tower.image_size)
        video_token_id = config.get("video_token_index", config.get("video_token_id"))
        video_token = processor_config.get("video_token")
        if video_token is not None and tokenizer.backend.token_to_id(video_token) != video_token_id:
            raise ValueError(f"the processor's video token {video_token!r} is not id {video_token_id} "
                             "(the config's video_token_index)")
        ratio = processor_config.get("vision_aspect_ratio", layout.aspect_ratio_name)
        if ratio != layout.aspect_ratio_name:  # the processor counts tokens with its own
            raise ValueError(f"the processor's vision_aspect_ratio {ratio!r} differs from the model's "
                             f"{layout.aspect_ratio_name!r}: they would disagree on every image's token count")

    with torch.device("meta"):
        encoder = OpenCLIPEncoder(**encoder_config)
        model = VisionLanguageModel(
            encoder, projectors.build("mlp", encoder.hidden_size, decoder_config.d_model, depth=2),
            Decoder(decoder_config), tokenizer, image_token_id, layout=layout, video_token_id=video_token_id,
        )
    patch = processor_config.get("patch_size", tower.patch_size)
    if onevision:
        per_view = processor_config.get("num_image_tokens", model.view_side ** 2)
        if per_view != model.view_side ** 2:
            raise ValueError(f"the processor counts {per_view} tokens per view but the tower gives "
                             f"{model.view_side ** 2}")
    elif processor_config:
        expected = (tower.image_size // patch) ** 2 + processor_config.get("num_additional_image_tokens", 0)
        expected -= 1 if processor_config.get("vision_feature_select_strategy", strategy) == "default" else 0
        if expected != model.num_image_tokens:
            raise ValueError(f"the processor expands an image to {expected} tokens but the model produces "
                             f"{model.num_image_tokens}; check patch_size / num_additional_image_tokens")

    vision, proj, decoder = _split_hf_state(read_safetensors(hf_dir))
    state = vision_state_from_hf(vision, tower, encoder.num_layers)
    if "image_newline" in proj:
        state["image_newline"] = proj.pop("image_newline")
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
    check_out_dir(out_dir)

    model.load_state_dict(state, assign=True)
    if decoder_config.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.model.embed_tokens.weight
    model.save_pretrained(out_dir)
    return out_dir


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
