"""The rank side of test_fsdp2.py, run as `torchrun --nproc-per-node 2 -m tests.multimodal.parallel.worker
TOKENIZER_DIR OUT_DIR` (gloo, one thread per rank). Rank r trains on micro-batches r, 2 + r, 4 + r of
`micro_batches` (micro-batch 3, rank 1's second, holds no image) under the fsdp2 strategy, in fp32 and
then with the bf16 policy; then every rank checks weights it initialised from its own seed. Rank 0
writes what the ranks saw to OUT_DIR/fsdp2.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lm.attention import SeqLayout
from lm.loss import IGNORE_INDEX
from multimodal.batch import Batch
from multimodal.parallel import FSDP2Strategy, WeightsDiffer, check_identical_weights
from multimodal.training import ModelSpec, StageConfig, VLMModule, build_model
from tests.multimodal.tiny import TINY_CLIP

STEPS = 3
CLIP = 0.05  # low enough that clipping acts in every step
TEXT_ONLY = 3  # the micro-batch without images


def spec(tokenizer_dir: str) -> ModelSpec:
    return ModelSpec(tokenizer=tokenizer_dir, decoder="tiny", decoder_options={"attention": "sdpa"},
                     encoder={"model_name": TINY_CLIP, "feature_layer": -2}, projector={"kind": "mlp", "depth": 2})


def stage() -> StageConfig:
    return StageConfig(train=["encoder", "projector", "decoder"],
                       lr={"encoder": 1e-3, "projector": 1e-3, "decoder": 1e-3}, gradient_checkpointing=True)


def micro_batches(tokenizer_dir: str) -> list[Batch]:
    """2 x STEPS packed micro-batches of 2 rows x 48 tokens: random text around image placeholders
    (one or two images a row), labels on the text after them; micro-batch TEXT_ONLY has no image."""
    model = build_model(spec(tokenizer_dir))
    vocab, placeholder = model.tokenizer.vocab_size, model.image_placeholder()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for index in range(2 * STEPS):
        ids, images, lengths = [], 0, []
        for row in range(2):
            count = 0 if index == TEXT_ONLY else 1 + (index + row) % 2
            text = torch.randint(10, vocab - 10, (48,), generator=generator).tolist()
            row_ids = text[:3]
            for image in range(count):  # each image's run of placeholders, one text token after it
                row_ids += placeholder + text[3 + image:4 + image]
            ids.append(row_ids + text[len(row_ids):])
            images += count
            lengths.append([40, 8])
        input_ids = torch.tensor(ids)
        labels = input_ids.clone()
        labels[input_ids == model.image_token_id] = IGNORE_INDEX
        labels[:, :4] = IGNORE_INDEX
        pixels = torch.randn(images, 3, 32, 32, generator=generator) if images else None
        batches.append(Batch(input_ids=input_ids, labels=labels, pixels=pixels, layout=SeqLayout.packed(lengths)))
    return batches


class Recorder(L.Callback):
    """Each step's full gradients (before clipping) and each micro-batch's loss."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = {}
        for name, p in module.named_parameters():
            if p.grad is not None:
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[name] = grad.detach().clone()
        self.grads.append(grads)


def trainer(strategy, callbacks, **options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CLIP,
                     strategy=strategy, callbacks=callbacks, **options)


def loader(batches: list[Batch]) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def full_weights(module: VLMModule) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def run(tokenizer_dir: str, batches: list[Batch], rank: int, **strategy) -> tuple[Recorder, dict]:
    L.seed_everything(0, verbose=False)
    module, recorder = VLMModule(spec(tokenizer_dir), stage()), Recorder()
    fsdp = FSDP2Strategy(encoder_checkpointing=True, **strategy)
    trainer(fsdp, [recorder], devices=2, use_distributed_sampler=False).fit(module, loader(batches[rank::2]))
    return recorder, full_weights(module)


def main(tokenizer_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    batches = micro_batches(tokenizer_dir)
    rank = int(__import__("os").environ["RANK"])
    fp32, weights = run(tokenizer_dir, batches, rank)
    bf16, _ = run(tokenizer_dir, batches, rank, param_dtype="bf16")
    losses = [None, None]
    dist.all_gather_object(losses, {"fp32": fp32.losses, "bf16": bf16.losses})
    # Weights each rank initialised from its own seed: every rank must stop with the same error.
    torch.manual_seed(100 + rank)
    try:
        check_identical_weights(build_model(spec(tokenizer_dir)))
        error = None
    except WeightsDiffer as caught:
        error = str(caught)
    errors = [None, None]
    dist.all_gather_object(errors, error)
    if rank == 0:
        torch.save({"grads": fp32.grads, "losses": losses, "weights": weights, "errors": errors},
                   Path(out) / "fsdp2.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
