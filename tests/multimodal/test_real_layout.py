"""The VLM built from a Salamandra checkpoint directory in the released layout (tests/real_layout.py),
and the shipped presets for the real models (configs/salamandra-*.yaml), built on the meta device."""

import re
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer

import projector
from encoders import OpenCLIPEncoder
from lm import Decoder, LMConfig
from lm.loss import IGNORE_INDEX
from multimodal.conversation import tokenize_conversation
from multimodal.training import ModelSpec, StageConfig, build_model, image_layout
from tests.multimodal.tiny import TINY_CLIP
from tests.real_layout import write_salamandra_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REAL_CONFIGS = sorted(CONFIGS.glob("salamandra-*.yaml"))

CONVERSATIONS = [
    [{"role": "user", "content": "¿Qué muestra la imagen?\nResponde en español."},
     {"role": "assistant", "content": "Un círculo rojo sobre un fondo azul."}],
    [{"role": "system", "content": "Respon en català."},
     {"role": "user", "content": "Què hi ha a la imatge?"},
     {"role": "assistant", "content": "Un cercle vermell.\nI un fons blau."},
     {"role": "user", "content": "I la mida? Digues-ho amb l'àvia i el nét."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_salamandra_checkpoint(tmp_path_factory.mktemp("salamandra"), template="chatml")


@pytest.fixture(scope="module")
def vlm(checkpoint):
    torch.manual_seed(0)
    spec = ModelSpec(tokenizer=str(checkpoint), decoder=str(checkpoint), decoder_options={"attention": "sdpa"},
                     encoder={"model_name": TINY_CLIP, "feature_layer": -2, "drop_cls": True},
                     projector={"kind": "mlp", "depth": 2})
    return build_model(spec)


def test_build_model_reads_the_checkpoint(checkpoint, vlm):
    assert vlm.tokenizer.vocab_size == vlm.decoder.config.vocab_size
    assert vlm.image_token_id == 6  # <|reserved_token_1|>: no new token, no embedding resize
    assert vlm.decoder.config.d_model == 64 and vlm.projector(torch.zeros(1, 16, 48)).shape == (1, 16, 64)
    state = vlm.decoder.state_dict()
    for shard in sorted(checkpoint.glob("model-*-of-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                # Loaded as float32 master weights, exactly the bf16 values on disk.
                assert torch.equal(state[key], f.get_tensor(key).float()), key


def test_the_built_model_answers(vlm):
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    messages = [{"role": "user", "content": "<image>\nDescriu la imatge."}]
    answer = vlm.eval().chat(messages, images=image, max_new_tokens=4)
    vlm.train()
    assert isinstance(answer, str)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_text_conversations_match_transformers(checkpoint, vlm, index, add_generation_prompt):
    messages = CONVERSATIONS[index][:-1] if add_generation_prompt else CONVERSATIONS[index]
    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    tokenized = tokenize_conversation(messages, vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens,
                                      add_generation_prompt=add_generation_prompt)
    assert tokenized.input_ids == [1, *expected]
    learned = vlm.tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels)
                                    if label != IGNORE_INDEX], skip_special_tokens=False)
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert learned == "".join(answers)


# --- the shipped presets for the real models -------------------------------------------------------


ONEVISION_STAGES = {"stage1": None, "stage1.5": "stage1", "stage2-si": "stage1.5", "stage2-ov": "stage2-si"}


def test_every_real_model_preset_is_shipped():
    names = {p.name for p in REAL_CONFIGS}
    llava = {f"salamandra-{size}-{tower}-stage{stage}.yaml"
             for size in ("2b", "7b") for tower in ("siglip", "clip") for stage in (1, 2)}
    onevision = {f"salamandra-{size}-onevision-{stage}.yaml" for size in ("2b", "7b") for stage in ONEVISION_STAGES}
    sharded = {"salamandra-7b-siglip-stage2-fsdp.yaml", "salamandra-7b-onevision-stage2-si-fsdp.yaml",
               "salamandra-7b-onevision-stage2-ov-fsdp.yaml"}
    assert names == llava | onevision | sharded


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: p.name)
def test_real_model_preset_builds_on_the_meta_device(path):
    config = yaml.safe_load(path.read_text())
    spec = ModelSpec(**config["model"]["model"])
    stage = StageConfig(**config["model"]["stage"])
    size, tower, stage_name, sharded = re.fullmatch(r"salamandra-(2b|7b)-(siglip|clip|onevision)-(stage[\w.]+(?:-si|-ov)?)(-fsdp)?",
                                                    path.stem).groups()
    # Sharded presets compute in bf16 through the fsdp2 policy, the others through autocast.
    assert config["trainer"]["precision"] == ("32-true" if sharded else "bf16-mixed")
    assert spec.tokenizer == spec.decoder and "salamandra-" + size in spec.decoder
    assert spec.encoder["model_name"] in open_clip.list_models()
    assert str(spec.encoder["pretrained"]).endswith(".safetensors")  # a local file: nothing is downloaded
    if stage_name == "stage1":
        assert stage.train == ["projector"] and stage.lr == {"projector": 1e-3} and stage.frozen_dtype == "bf16"
        assert spec.init_from is None
    else:
        assert sorted(stage.train) == ["decoder", "encoder", "projector"] and stage.gradient_checkpointing
        assert stage.lr["encoder"] < stage.lr["decoder"]
        if tower == "onevision":  # LLaVA-NeXT's OneVision scripts: 1e-5, the tower 2e-6
            assert stage.lr == {"encoder": 2e-6, "projector": 1e-5, "decoder": 1e-5}
            assert spec.init_from.endswith(f"salamandra-{size}-onevision/{ONEVISION_STAGES[stage_name]}")
        else:
            assert stage.lr["decoder"] == 2e-5
            assert spec.init_from.endswith(f"salamandra-{size}-{tower}/stage1")
    if tower == "onevision":
        layout = image_layout(spec.layout, 384)
        assert layout.kind == ("fixed" if stage_name == "stage1" else "anyres")
        if layout.is_anyres:
            assert len(layout.grid_pinpoints) == (5 if stage_name == "stage1.5" else 36) and layout.max_tiles == 9
        assert (spec.video_token is not None) == (stage_name == "stage2-ov")

    options = {k: v for k, v in spec.encoder.items() if k != "pretrained"}
    with torch.device("meta"):
        encoder = OpenCLIPEncoder(**options)
        decoder = Decoder(LMConfig.from_name(f"salamandra-{size}"))
        proj = projector.build(in_dim=encoder.hidden_size, out_dim=decoder.config.d_model, **spec.projector)
    if tower in ("siglip", "onevision"):  # Salamandra vision: 27 x 27 patches of the 26th of 27 blocks, width 1152
        assert (encoder.image_size, encoder.hidden_size, encoder.num_tokens) == (384, 1152, 729)
        assert encoder.num_layers == encoder.num_layers_total - 1 == 26
        assert encoder.mean == (0.5, 0.5, 0.5)
        tanh = [m for m in encoder.modules() if getattr(m, "approximate", None) == "tanh" or type(m).__name__ == "GELUTanh"]
        assert bool(tanh) == (tower == "onevision")
    else:  # LLaVA-1.5: 24 x 24 patches of the penultimate layer, width 1024, QuickGELU
        assert (encoder.image_size, encoder.hidden_size, encoder.num_tokens) == (336, 1024, 576)
        assert encoder.num_layers == encoder.num_layers_total - 1 == 23
        assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in encoder.modules())
    d_model = {"2b": 2048, "7b": 4096}[size]
    assert sum(p.numel() for p in decoder.parameters()) == {"2b": 2_253_490_176, "7b": 7_768_117_248}[size]
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(encoder.hidden_size, d_model), (d_model, d_model)]
    assert any(isinstance(m, torch.nn.GELU) for m in proj.modules())
    assert proj.num_output_tokens(encoder.num_tokens) == encoder.num_tokens
