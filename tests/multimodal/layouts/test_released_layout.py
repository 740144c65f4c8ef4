"""A directory laid out as salamandra-7b-vision most likely is (LLaVA-NeXT's training, converted with
transformers' script; its own files are not reachable from here), built with transformers' own
classes at tiny sizes: a 26-layer SigLIP tower with gelu_pytorch_tanh, `<image>` and `<video>` added
to a Salamandra-layout tokenizer as new special tokens after its vocabulary, the embedding padded to a
multiple of 64, LlavaOnevisionProcessor files. `salamandra-vl import --from hf-llava-onevision` reads
it, and the imported model gives transformers' logits and greedy tokens."""

import pytest
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken

from multimodal import VisionLanguageModel
from multimodal.batch import Batch
from multimodal.cli import main
from multimodal.export import llava_chat_template
from multimodal.layouts import onevision_pinpoints
from tests.multimodal.layouts import tiny_onevision  # noqa: F401 - registers the 27-block tiny tower
from tests.numerics import assert_close_scaled

QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def released(tokenizer, tmp_path_factory):
    """A LLaVA-OneVision directory written by transformers, as the conversion script writes one."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    out = tmp_path_factory.mktemp("released") / "salamandra-vision-like"
    tokenizer.save(out)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    base = len(hf_tokenizer)
    hf_tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False),
                             AddedToken("<video>", special=True, normalized=False)], special_tokens=True)
    image_id, video_id = hf_tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    assert (image_id, video_id) == (base, base + 1)
    vocab = -(-len(hf_tokenizer) // 64) * 64  # resize_token_embeddings(..., pad_to_multiple_of=64)
    torch.manual_seed(1)
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(
            hidden_size=32, intermediate_size=128, num_hidden_layers=26, num_attention_heads=2, image_size=384,
            patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
        text_config=transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id),
        image_token_index=image_id, video_token_index=video_id, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=onevision_pinpoints(384), tie_word_embeddings=False,
    )
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # away from the initialisation's tiny values
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(out)
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            image_mean=[0.5] * 3, image_std=[0.5] * 3, image_grid_pinpoints=onevision_pinpoints(384),
            size={"height": 384, "width": 384}),
        video_processor=LlavaOnevisionVideoProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                     size={"height": 384, "width": 384}),
        tokenizer=hf_tokenizer, num_image_tokens=729, vision_feature_select_strategy="full",
        image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
        chat_template=llava_chat_template("<image>", "<video>"),
    )
    processor.save_pretrained(out)
    return out, model, processor


def test_import_of_the_released_layout_gives_transformers_logits(released, tmp_path):
    directory, hf, processor = released
    assert main(["import", "--from", "hf-llava-onevision", "--timm-model", "vit_salamandra_test_tiny_siglip384_27",
                 str(directory), str(tmp_path / "ours")]) == 0
    model = VisionLanguageModel.from_pretrained(tmp_path / "ours")
    assert model.tokenizer.id_to_token(model.image_token_id) == "<image>"
    assert model.tokenizer.id_to_token(model.video_token_id) == "<video>"
    assert model.decoder.config.vocab_size % 64 == 0 and model.encoder.num_layers == 26
    assert model.encoder.config()["activation"] == "gelu_tanh"
    image = Image.radial_gradient("L").convert("RGB").resize((700, 420))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=[[image]], text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    ids = model._prompt_ids([{"role": "user", "content": f"<image>\n{QUESTION}"}], [image])
    assert inputs["input_ids"][0].tolist() == ids
    pixels = model.preprocess([image])
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(Batch(input_ids=torch.tensor([ids]), pixels=pixels), return_logits=True)[1]
        generated = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert_close_scaled(theirs, ours, rel=1e-4)
    stop = {model.tokenizer.im_end_id, model.tokenizer.eos_id}
    generated = generated[:-1] if generated and generated[-1] in stop else generated
    assert model.generate([ids], pixels, max_new_tokens=6)[0] == generated
