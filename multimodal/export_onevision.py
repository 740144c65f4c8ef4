"""Hugging Face LLaVA-OneVision export: a model in the anyres layout -> a directory that
`transformers.AutoProcessor` and `LlavaOnevisionForConditionalGeneration` load with no extra code.

The weights use the layout released OneVision checkpoints use (`vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, `image_newline`, `language_model.model.*`,
`language_model.lm_head.weight`), which every transformers version from 4.45 reads; the tower, the
projector and the decoder are written as the LLaVA export writes them (multimodal/export.py: the
tower ends at our feature layer, so `vision_feature_layer` is -1, and all its tokens are kept:
`vision_feature_select_strategy` "full"). The config carries the layout (`image_grid_pinpoints`,
`vision_aspect_ratio`); the processor files carry the same, with `num_image_tokens` = one view's
tokens, which is how transformers 5.24's processor counts an image's placeholders.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm.hf import config_to_hf, write_safetensors
from multimodal.export import MAX_SHARD_BYTES, _check_out_dir, _hf_state, check_exportable, llava_chat_template
from multimodal.model import VisionLanguageModel

__all__ = ["export_hf_llava_onevision"]


def export_hf_llava_onevision(model_or_checkpoint_dir: VisionLanguageModel | str | Path, out_dir: str | Path) -> Path:
    """Write a model in the anyres layout (or the directory `save_pretrained` wrote it to) as a
    Hugging Face LLaVA-OneVision directory at `out_dir` (new or empty). Returns the directory.
    Raises ValueError, before writing anything, for what the layout cannot hold."""
    from transformers import AutoTokenizer, GenerationConfig, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    model = (model_or_checkpoint_dir if isinstance(model_or_checkpoint_dir, VisionLanguageModel)
             else VisionLanguageModel.from_pretrained(model_or_checkpoint_dir))
    if not model.layout.is_anyres:
        raise ValueError("the model's image layout is 'fixed' (one view per image): export it with --to hf-llava; "
                         "LLaVA-OneVision's format is for the anyres layout")
    out_dir = Path(out_dir)
    plan = check_exportable(model)
    if plan.tower.kind != "siglip":
        raise ValueError("LLaVA-OneVision's format holds a SigLIP vision tower (all tokens, no class token); "
                         f"this model's is {plan.tower.kind}")
    _check_out_dir(out_dir)
    tokenizer = model.tokenizer
    image_token = tokenizer.id_to_token(model.image_token_id)
    video_token_id = model.video_token_id
    video_token = tokenizer.id_to_token(video_token_id)
    decoder_dtype = model.decoder.lm_head.weight.dtype
    layout = model.layout

    text_config = config_to_hf(model.decoder.config, decoder_dtype)
    for key in ("architectures", "torch_dtype"):
        text_config.pop(key)
    text_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    pinpoints = [list(pair) for pair in layout.grid_pinpoints]
    config = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "vision_config": plan.tower.to_hf(),
        "text_config": text_config,
        "image_token_index": model.image_token_id,
        "video_token_index": video_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,  # the exported tower ends at our feature layer
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": layout.aspect_ratio_name,
        "image_grid_pinpoints": pinpoints,
        "tie_word_embeddings": model.decoder.config.tie_embeddings,
        "dtype": str(decoder_dtype).removeprefix("torch."),
    }
    state = _hf_state(model, plan)
    state["image_newline"] = model.image_newline.detach().to("cpu").contiguous()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(state, out_dir, MAX_SHARD_BYTES)
    GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=[tokenizer.im_end_id, tokenizer.eos_id],
        pad_token_id=tokenizer.pad_id, do_sample=False,
    ).save_pretrained(out_dir)

    tokenizer.save(out_dir)
    tile = model.encoder.image_size
    normalization = {"image_mean": list(model.encoder.mean), "image_std": list(model.encoder.std)}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints, do_pad=True, **normalization),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile}, **normalization),
        tokenizer=AutoTokenizer.from_pretrained(out_dir),
        num_image_tokens=model.view_side ** 2,
        vision_feature_select_strategy="full",
        chat_template=llava_chat_template(image_token, video_token),
        image_token=image_token,
        video_token=video_token,
        vision_aspect_ratio=layout.aspect_ratio_name,
    )
    processor.save_pretrained(out_dir)
    # Our own tokenizer files load in every transformers version (see multimodal/export.py).
    tokenizer.save(out_dir)
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["processor_class"] = "LlavaOnevisionProcessor"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")
    return out_dir
