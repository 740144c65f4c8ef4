"""LoRA adapters (multimodal.lora, peft): at initialisation the adapted model computes exactly what the
base model does; training moves only the adapters (and the stage's whole modules) and lowers the
loss; the adapters are saved apart and restored; merged and unmerged models agree; a merged model
exports to Hugging Face with the export's parity; LoRA trains with compiled blocks and gradient
checkpointing."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from multimodal.batch import Batch
from multimodal.cli import main
from multimodal.data import DataConfig
from multimodal.export import export_hf_llava
from multimodal.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, add_lora, merge_lora
from multimodal.model import VisionLanguageModel
from multimodal.training import ModelSpec, ShardDataModule, StageConfig, VLMModule, parameter_report
from tests.multimodal.data.helpers import write_shards
from tests.multimodal.tiny import TINY_CLIP, build_tiny_vlm

QUESTION = "Describe the image."


def logits_of(model, image):
    ids = model._prompt_ids([{"role": "user", "content": f"<image>\n{QUESTION}"}])
    with torch.no_grad():
        return model(Batch(input_ids=torch.tensor([ids]), pixels=model.preprocess([image])))[1]


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


IMAGE = Image.new("RGB", (40, 30), (200, 40, 90))


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A tiny model trained 12 steps with LoRA (r 4) on the decoder, the projector whole."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer.save(root / "tokenizer")
    shards, _ = write_shards(root / "shards", num_samples=24, num_shards=2)
    spec = ModelSpec(tokenizer=str(root / "tokenizer"), decoder="tiny", decoder_options={"attention": "sdpa"},
                     encoder={"model_name": TINY_CLIP})
    stage = StageConfig(train=["projector", "decoder"], lr={"projector": 3e-3, "decoder": 1e-2})
    module = VLMModule(spec, stage, export_dir=str(root / "export"), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Losses()]).fit(
        module, datamodule=ShardDataModule(DataConfig(shards, max_tokens=160, rows_per_batch=2, shuffle_buffer=8),
                                           num_workers=0))
    return root, module, before, losses


def test_fresh_adapters_leave_the_model_exactly_as_it_was(tokenizer):
    model = build_tiny_vlm(tokenizer).eval()
    base = logits_of(model, IMAGE)
    add_lora(model, LoraSettings(r=8, encoder=True))
    assert torch.equal(logits_of(model, IMAGE), base)
    names = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert any(n.startswith("decoder.") for n in names) and any(n.startswith("encoder.") for n in names)


def test_only_adapters_and_the_projector_learn_and_the_loss_falls(trained):
    _, module, before, losses = trained
    after = module.model.state_dict()
    for name, tensor in after.items():
        if ".lora_B" in name or name.startswith("projector."):
            continue
        if ".lora_A" in name:
            continue
        assert torch.equal(tensor, before[name]), name  # base weights (decoder, encoder) frozen
    assert any(not torch.equal(after[n], before[n]) for n in after if ".lora_B" in n)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("projector.") for n in trainable)
    adapters = sum(p.numel() for n, p in module.model.named_parameters() if ".lora_" in n)
    report = parameter_report(module.model)
    assert f"{adapters:,} trainable" in report.splitlines()[3]  # the decoder's line counts its adapters


def test_adapters_are_saved_apart_and_restored(trained):
    root, module, _, _ = trained
    export = root / "export"
    assert (export / ADAPTER_CONFIG).exists() and (export / ADAPTER_WEIGHTS).exists()
    weights = load_file(export / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    restored = VisionLanguageModel.from_pretrained(export)
    plain = merge_lora(VisionLanguageModel.from_pretrained(export))
    assert set(weights) == set(plain.state_dict())  # the names a model without adapters has
    assert restored.lora == module.lora
    assert torch.equal(logits_of(restored, IMAGE), logits_of(module.model.eval(), IMAGE))


def test_merged_and_unmerged_models_agree_and_export_to_hugging_face(trained, tmp_path, capsys):
    root, _, _, _ = trained
    adapted = VisionLanguageModel.from_pretrained(root / "export")
    unmerged = logits_of(adapted, IMAGE)
    assert main(["merge", str(root / "export"), str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / ADAPTER_CONFIG).exists()
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert merged.lora is None and relative(logits_of(merged, IMAGE), unmerged) < 1e-5
    # The trained adapters change the function (so the agreement above says something).
    from peft.tuners.tuners_utils import BaseTunerLayer

    switched_off = VisionLanguageModel.from_pretrained(root / "export")
    for layer in switched_off.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(False)
    assert relative(logits_of(switched_off, IMAGE), unmerged) > 1e-3
    # export merges first (the model given keeps its adapters); HF gives our logits.
    out = export_hf_llava(adapted, tmp_path / "hf")
    assert adapted.lora is not None
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=IMAGE, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**inputs).logits
    assert relative(theirs, unmerged) < 1e-4
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "again")]) == 2
    assert "no LoRA adapters" in capsys.readouterr().err


def test_lora_trains_with_compiled_blocks_and_gradient_checkpointing(trained):
    root, _, _, _ = trained
    spec = ModelSpec(tokenizer=str(root / "tokenizer"), decoder="tiny", decoder_options={"attention": "sdpa"},
                     encoder={"model_name": TINY_CLIP})
    shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    losses = {}
    for name, options in (("eager", {}), ("compiled", {"compile": {"backend": "aot_eager"},
                                                        "gradient_checkpointing": True})):
        stage = StageConfig(train=["projector", "decoder"], lr={"projector": 1e-3, "decoder": 1e-2}, **options)
        module = VLMModule(spec, stage, lora=LoraSettings(r=4, dropout=0.0))
        torch.manual_seed(0)
        history = []

        class Losses(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                history.append(float(outputs["loss"]))

        L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  callbacks=[Losses()]).fit(module, datamodule=ShardDataModule(
                      DataConfig(shards, max_tokens=160, rows_per_batch=2, shuffle_buffer=8), num_workers=0))
        losses[name] = history
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)


def test_lora_needs_the_stage_to_train_what_it_adapts(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer")
    spec = ModelSpec(tokenizer=str(tmp_path / "tokenizer"), decoder="tiny", encoder={"model_name": TINY_CLIP})
    with pytest.raises(ValueError, match="LoRA adapts"):
        VLMModule(spec, StageConfig(train=["projector"], lr={"projector": 1e-3}), lora=LoraSettings()).configure_model()
    with pytest.raises(ValueError, match="targets"):
        LoraSettings(targets=["lm_head"])
