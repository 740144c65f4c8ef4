"""Export to / import from the Hugging Face LLaVA format, checked against transformers itself.

The reference is transformers' own code: `AutoProcessor` and `LlavaForConditionalGeneration`
loaded from the exported directory, with nothing of ours in between.

Preprocessing: our transform equals Hugging Face's image processor on its Pillow backend bit for
bit, so the logits and generation tests run the whole Hugging Face pipeline
(`AutoProcessor.from_pretrained(dir, backend="pil")`: chat template, image-token expansion,
pixels) and compare with ours. transformers' default backend (torchvision) resizes with its own
antialiased kernels; `test_default_processor_pixels_are_within_two_levels` checks it separately,
with a stated tolerance: at most 2 levels of 255 per pixel before normalization, same token ids.
"""

import copy
import json
import shutil

import pytest
import skimage.data
import torch
import transformers
from PIL import Image

import projector
from encoders import OpenCLIPEncoder
from lm import Decoder, LMConfig
from multimodal import VisionLanguageModel
from multimodal.batch import Batch
from multimodal.cli import main
from multimodal.export import export_hf_llava, import_hf_llava
from tests.encoders.tiny_towers import CONFIGS
from tests.multimodal.tiny import TINY_CLIP, build_tiny_vlm
from tests.numerics import assert_close_scaled

QUESTION = "Describe the image in English, please."
# transformers' modules against ours: other kernels, other summation orders. Tolerances are
# relative to the largest entry of the reference (assert_close_scaled), not element-wise.
LOGITS_REL = 1e-5


@pytest.fixture(scope="module")
def images():
    return {"chelsea": Image.fromarray(skimage.data.chelsea()), "astronaut": Image.fromarray(skimage.data.astronaut())}


@pytest.fixture(scope="module", params=["clip", "siglip"])
def exported(request, tokenizer, tmp_path_factory):
    """(our model, export directory, HF model, HF processor on the Pillow backend)."""
    model = build_tiny_vlm(tokenizer, tower=request.param).eval()
    out = export_hf_llava(model, tmp_path_factory.mktemp(f"hf-{request.param}") / "llava")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
    return model, out, hf, processor


def hf_inputs(processor, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


def our_prompt(model):
    return model._prompt_ids([{"role": "user", "content": f"<image>\n{QUESTION}"}])


def our_logits(model, ids, pixels):
    with torch.no_grad():
        return model(Batch(input_ids=torch.tensor([ids]), pixels=pixels))[1]


def test_hf_pipeline_gives_our_tokens_pixels_and_logits(exported, images):
    model, _, hf, processor = exported
    ids = our_prompt(model)
    for image in images.values():
        inputs = hf_inputs(processor, image)
        # The processor expanded the one image token into exactly num_image_tokens placeholders.
        assert inputs["input_ids"][0].tolist() == ids
        assert (inputs["input_ids"] == model.image_token_id).sum() == model.num_image_tokens
        pixels = model.preprocess([image])
        assert torch.equal(inputs["pixel_values"], pixels)
        with torch.no_grad():
            theirs = hf(**inputs).logits
        ours = our_logits(model, ids, pixels)
        assert theirs.shape == ours.shape
        assert_close_scaled(theirs, ours, rel=LOGITS_REL)
    # The comparison covers the vision path: another image changes the logits far beyond the tolerance.
    other = our_logits(model, ids, model.preprocess([images["astronaut"]]))
    chelsea = our_logits(model, ids, model.preprocess([images["chelsea"]]))
    assert (other - chelsea).abs().max() > 100 * LOGITS_REL * chelsea.abs().max()


def test_hf_vision_features_equal_ours_tightly(exported, images):
    """The tower alone, at a tolerance far below what a GELU approximation (tanh vs exact) or
    another LayerNorm epsilon would cause; the logits test above cannot see such small changes.

    In float64: on the tiny SigLIP tower a tanh GELU moves the features by only ~2e-6 of their
    largest entry, while fp32 kernels (MKL's compatible path, AVX2, default ATen) already differ by
    up to 4e-7; in float64 the two implementations agree to ~5e-16, so 1e-9 separates both."""
    model, _, hf, _ = exported
    model, hf = copy.deepcopy(model).double(), copy.deepcopy(hf).double()
    pixels = model.preprocess(list(images.values())).double()
    with torch.no_grad():
        theirs = hf.model.get_image_features(pixel_values=pixels).pooler_output
        ours = model.encode_images(pixels)
        tower = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        features = model.encoder(pixels)
    if hf.config.vision_feature_select_strategy == "default":
        tower = tower[:, 1:]
    assert_close_scaled(tower, features, rel=1e-9, msg="tower")
    assert_close_scaled(torch.stack(list(theirs)), ours, rel=1e-9, msg="projected")


def test_hf_greedy_generate_equals_our_generate_and_caption(exported, images):
    model, _, hf, processor = exported
    stop = {model.tokenizer.im_end_id, model.tokenizer.eos_id}
    for image in images.values():
        inputs = hf_inputs(processor, image)
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        if theirs and theirs[-1] in stop:  # HF returns the stop token, ours does not
            theirs = theirs[:-1]
        ours = model.generate([our_prompt(model)], model.preprocess([image]), max_new_tokens=12)[0]
        # Exact tokens are robust across kernels: along these paths the smallest top-1/top-2 gap
        # is ~8e-3 of the logits' largest entry, hundreds of times the logits tolerance above.
        assert theirs == ours and len(ours) > 0
        caption = model.caption(image, prompt=QUESTION, max_new_tokens=12)
        assert processor.decode(theirs, skip_special_tokens=True) == caption


def test_default_processor_pixels_are_within_two_levels(exported, images):
    """transformers' default (torchvision) backend: same ids, pixels within 2/255 before normalizing."""
    model, out, _, _ = exported
    processor = transformers.AutoProcessor.from_pretrained(out)
    std = torch.tensor(model.encoder.std).view(1, 3, 1, 1)
    for image in images.values():
        inputs = hf_inputs(processor, image)
        assert inputs["input_ids"][0].tolist() == our_prompt(model)
        levels = (inputs["pixel_values"] - model.preprocess([image])).abs() * std * 255
        assert levels.max() <= 2 + 1e-3
        assert levels.mean() < 0.1


def test_config_describes_the_tower(exported):
    model, out, hf, _ = exported
    config = json.loads((out / "config.json").read_text())
    vision = config["vision_config"]
    clip = model.encoder.tower_type == "open_clip"
    assert vision["model_type"] == ("clip_vision_model" if clip else "siglip_vision_model")
    assert vision["hidden_act"] == "gelu"  # open_clip's nn.GELU and timm's SigLIP GELU are both exact
    assert vision["layer_norm_eps"] == (1e-5 if clip else 1e-6)
    assert vision["num_hidden_layers"] == model.encoder.num_layers  # the stored (truncated) tower
    assert (vision["image_size"], vision["patch_size"]) == (32, 8)
    assert config["vision_feature_select_strategy"] == ("default" if clip else "full")
    assert config["image_token_index"] == model.image_token_id
    assert config["image_seq_length"] == model.num_image_tokens
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["image_token"] == "<|reserved_token_1|>"
    assert processor["num_additional_image_tokens"] == (1 if clip else 0)
    assert hf.config.text_config.num_key_value_heads == model.decoder.config.n_kv_heads


def test_quick_gelu_tower_with_class_token_kept(tokenizer, tmp_path, images):
    """An OpenAI-style tower (QuickGELU), penultimate layer, CLS kept: 'full' strategy, 17 tokens."""
    torch.manual_seed(1)
    encoder = OpenCLIPEncoder({**TINY_CLIP, "quick_gelu": True}, feature_layer=-2, drop_cls=False,
                              preprocess_cfg={"interpolation": "bilinear"})
    model = vlm_with(tokenizer, encoder).eval()
    out = export_hf_llava(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == "quick_gelu"
    assert config["vision_feature_select_strategy"] == "full" and model.num_image_tokens == 17
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    inputs = hf_inputs(transformers.AutoProcessor.from_pretrained(out, backend="pil"), images["chelsea"])
    assert torch.equal(inputs["pixel_values"], model.preprocess([images["chelsea"]]))
    with torch.no_grad():
        theirs = hf(**inputs).logits
    assert_close_scaled(theirs, our_logits(model, our_prompt(model), inputs["pixel_values"]), rel=LOGITS_REL)
    back = VisionLanguageModel.from_pretrained(import_hf_llava(out, tmp_path / "back"))
    assert back.encoder.config()["model_name"]["quick_gelu"] is True and not back.encoder.drop_cls
    assert_same_weights(model, back)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def test_round_trip_is_bit_identical(exported, images, tmp_path):
    model, out, _, _ = exported
    back = VisionLanguageModel.from_pretrained(import_hf_llava(out, tmp_path / "back"))
    assert_same_weights(model, back)
    assert back.num_image_tokens == model.num_image_tokens and back.image_token_id == model.image_token_id
    ours_config, back_config = model.encoder.config(), back.encoder.config()
    assert back_config["preprocess_cfg"] == ours_config["preprocess_cfg"]
    assert back.decoder.config.to_dict() | {"attention": "x"} == model.decoder.config.to_dict() | {"attention": "x"}
    ids = our_prompt(model)
    assert our_prompt(back) == ids
    for image in images.values():
        pixels = model.preprocess([image])
        assert torch.equal(back.preprocess([image]), pixels)
        assert torch.equal(our_logits(back, ids, pixels), our_logits(model, ids, pixels))
    # A second export of the imported model writes the same tensors.
    again = export_hf_llava(back, tmp_path / "again")
    first = transformers.LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    second = transformers.LlavaForConditionalGeneration.from_pretrained(again).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_import_reads_what_transformers_itself_saves(exported, tmp_path):
    """transformers 5 saves the vision tower without `vision_model.` and its own tokenizer files."""
    model, _, hf, processor = exported
    hf.save_pretrained(tmp_path / "resaved")
    processor.save_pretrained(tmp_path / "resaved")
    back = VisionLanguageModel.from_pretrained(import_hf_llava(tmp_path / "resaved", tmp_path / "back"))
    assert_same_weights(model, back)


def vlm_with(tokenizer, encoder, kind="mlp", **options):
    decoder = Decoder(LMConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, attention="sdpa"))
    proj = projector.build(kind, encoder.hidden_size, decoder.config.d_model, **options)
    return VisionLanguageModel(encoder, proj, decoder, tokenizer, image_token_id=tokenizer.reserved_token_id(1))


def tiny_clip(**options):
    return OpenCLIPEncoder(TINY_CLIP, **options)


REFUSALS = {
    "pixel_shuffle": (lambda: tiny_clip(), "pixel_shuffle", {}, "projector kind 'pixel_shuffle'"),
    "linear": (lambda: tiny_clip(), "linear", {}, "projector option depth=1"),
    "deep_mlp": (lambda: tiny_clip(), "mlp", {"depth": 3}, "projector option depth=3"),
    "positions": (lambda: tiny_clip(), "mlp", {"positions": 16}, "projector option positions=16"),
    "longest": (lambda: tiny_clip(preprocess_cfg={"resize_mode": "longest"}), "mlp", {}, "resize_mode 'longest'"),
    "layer_scale": (lambda: OpenCLIPEncoder({**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "ls_init_value": 0.1}}),
                    "mlp", {}, "ls_1.gamma"),
    "register_tokens": (lambda: OpenCLIPEncoder(CONFIGS["salamandra-test-tiny-prefix"], preprocess_cfg={"mean": 0.5, "std": 0.5}),
                        "mlp", {}, "class/register tokens"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_option_and_write_nothing(tokenizer, tmp_path, case):
    make_encoder, kind, options, message = REFUSALS[case]
    model = vlm_with(tokenizer, make_encoder(), kind, **options)
    with pytest.raises(ValueError, match="cannot export to the Hugging Face LLaVA format") as error:
        export_hf_llava(model, tmp_path / "out")
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_every_problem_is_listed_at_once(tokenizer, tmp_path):
    model = vlm_with(tokenizer, tiny_clip(preprocess_cfg={"resize_mode": "longest"}), "mlp", depth=3, positions=16)
    with pytest.raises(ValueError) as error:
        export_hf_llava(model, tmp_path / "out")
    assert all(m in str(error.value) for m in ("depth=3", "positions=16", "resize_mode 'longest'"))
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_directory(vlm, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        export_hf_llava(vlm, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("change, message", [
    ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu'"),
    ({"vision_feature_layer": [-2, -1]}, "several feature layers"),
    ({"vision_config": {"model_type": "dinov2"}}, "vision tower 'dinov2'"),
])
def test_import_refusals_write_nothing(vlm, tmp_path, change, message):
    hf_dir = export_hf_llava(vlm, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        import_hf_llava(hf_dir, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_import_refuses_a_siglip_tower_no_timm_model_has(tokenizer, tmp_path):
    model = build_tiny_vlm(tokenizer, tower="siglip")
    hf_dir = export_hf_llava(model, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    # The tiny timm tower's GELU is exact; gelu_pytorch_tanh would import with the encoder option
    # activation="gelu_tanh" (test_gelu_tanh_siglip_saves_exports_and_imports), gelu_new cannot.
    config["vision_config"]["hidden_act"] = "gelu_new"
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="matches except that its activation is 'gelu', not 'gelu_new'"):
        import_hf_llava(hf_dir, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_gelu_tanh_siglip_saves_exports_and_imports(tokenizer, images, tmp_path):
    """A SigLIP tower with activation="gelu_tanh" (as Google's, Hugging Face's and LLaVA-OneVision's
    SigLIP) keeps it through save_pretrained / from_pretrained, exports as gelu_pytorch_tanh with
    LLaVA's logits and tower features equal to ours, and imports back as gelu_tanh.

    The encoder's weights are randomized: at their initial scale tanh and erf GELU move the logits
    by ~2e-6 of their largest entry, below LOGITS_REL; randomized, by ~1.6e-4."""
    def build(activation):
        torch.manual_seed(0)
        encoder = OpenCLIPEncoder(CONFIGS["salamandra-test-tiny-siglip"], feature_layer=-1, activation=activation,
                                  preprocess_cfg={"mean": 0.5, "std": 0.5, "resize_mode": "squash"})
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in encoder.parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        return vlm_with(tokenizer, encoder).eval()

    model, erf = build("gelu_tanh"), build(None)
    assert_same_weights(model, erf)
    ids = our_prompt(model)
    pixels = model.preprocess(list(images.values()))
    logits = our_logits(model, ids, pixels[:1])
    # The two activations differ in the logits by far more than the tolerance used below.
    assert (our_logits(erf, ids, pixels[:1]) - logits).abs().max() > 10 * LOGITS_REL * logits.abs().max()

    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["encoder"]["activation"] == "gelu_tanh"
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.encoder.activation == "gelu_tanh" and loaded.encoder.config() == model.encoder.config()
    assert_same_weights(model, loaded)
    assert torch.equal(our_logits(loaded, ids, pixels[:1]), logits)

    out = export_hf_llava(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
    for image in images.values():
        inputs = hf_inputs(processor, image)
        assert inputs["input_ids"][0].tolist() == ids
        with torch.no_grad():
            theirs = hf(**inputs).logits
        assert_close_scaled(theirs, our_logits(model, ids, inputs["pixel_values"]), rel=LOGITS_REL)
    # The tower alone in float64, where the implementations agree to ~1e-15 (see
    # test_hf_vision_features_equal_ours_tightly) and the other GELU is ~1e-4 away.
    model64, erf64, hf64 = (copy.deepcopy(m).double() for m in (model, erf, hf))
    with torch.no_grad():
        tower = hf64.model.vision_tower(pixels.double(), output_hidden_states=True).hidden_states[-1]
        ours, other = model64.encoder(pixels.double()), erf64.encoder(pixels.double())
    assert_close_scaled(tower, ours, rel=1e-9, msg="tower")
    assert (other - ours).abs().max() > 1e-5 * ours.abs().max()

    back = VisionLanguageModel.from_pretrained(import_hf_llava(out, tmp_path / "back")).eval()
    assert back.encoder.activation == "gelu_tanh"
    assert back.encoder.config()["activation"] == "gelu_tanh"
    assert_same_weights(model, back)
    assert torch.equal(our_logits(back, ids, pixels[:1]), logits)


def test_cli_export_and_import(vlm, tmp_path, capsys):
    vlm.save_pretrained(tmp_path / "ckpt")
    assert main(["export", "--to", "hf-llava", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert hf.config.image_token_id == vlm.image_token_id
    assert main(["import", "--from", "hf-llava", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert_same_weights(vlm, VisionLanguageModel.from_pretrained(tmp_path / "back"))
    # Errors are one line on stderr and exit status 2; nothing is written.
    assert main(["export", "--to", "hf-llava", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "back")
    assert main(["import", "--from", "hf-llava", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 2
    assert "model_type None, expected 'llava'" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


def test_cli_help_names_the_formats(capsys):
    for command in ("export", "import"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "hf-llava" in capsys.readouterr().out
