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

from pathlib import Path

from multimodal.export import (check_exportable, check_out_dir, hf_llava_state, llava_chat_template, llava_text_config,
                               model_to_export, write_model_files, write_own_tokenizer)
from multimodal.model import VisionLanguageModel

__all__ = ["export_hf_llava_onevision"]


def export_hf_llava_onevision(model_or_checkpoint_dir: VisionLanguageModel | str | Path, out_dir: str | Path) -> Path:
    """Write a model in the anyres layout (or the directory `save_pretrained` wrote it to) as a
    Hugging Face LLaVA-OneVision directory at `out_dir` (new or empty). Returns the directory.
    Raises ValueError, before writing anything, for what the layout cannot hold."""
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    model = model_to_export(model_or_checkpoint_dir)
    if not model.layout.is_anyres:
        raise ValueError("the model's image layout is 'fixed' (one view per image): export it with --to hf-llava; "
                         "LLaVA-OneVision's format is for the anyres layout")
    out_dir = Path(out_dir)
    plan = check_exportable(model)
    if plan.tower.kind != "siglip":
        raise ValueError("LLaVA-OneVision's format holds a SigLIP vision tower (all tokens, no class token); "
                         f"this model's is {plan.tower.kind}")
    check_out_dir(out_dir)
    tokenizer = model.tokenizer
    image_token = tokenizer.id_to_token(model.image_token_id)
    video_token_id = model.video_token_id
    video_token = tokenizer.id_to_token(video_token_id)
    layout = model.layout
    pinpoints = [list(pair) for pair in layout.grid_pinpoints]
    config = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "vision_config": plan.tower.to_hf(),
        "text_config": llava_text_config(model),
        "image_token_index": model.image_token_id,
        "video_token_index": video_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,  # the exported tower ends at our feature layer
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": layout.aspect_ratio_name,
        "image_grid_pinpoints": pinpoints,
        "tie_word_embeddings": model.decoder.config.tie_embeddings,
        "dtype": str(model.decoder.lm_head.weight.dtype).removeprefix("torch."),
    }
    state = hf_llava_state(model, plan)
    state["image_newline"] = model.image_newline.detach().to("cpu").contiguous()
    write_model_files(out_dir, config, state, tokenizer)

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
    write_own_tokenizer(out_dir, tokenizer, "LlavaOnevisionProcessor")
    return out_dir
