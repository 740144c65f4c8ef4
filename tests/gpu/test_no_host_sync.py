"""A training step of the VisionLanguageModel on CUDA never makes the host wait for the GPU (no
`.item()`, `.nonzero()`, `.tolist()` or copy from pageable memory), and its loss equals the CPU's.

torch.cuda.set_sync_debug_mode("error") turns every synchronising call into an error."""

import pytest
import torch

from lm.tokenizer import train_tokenizer
from multimodal.data.packing import make_batch
from multimodal.data.samples import TokenizedSample
from tests.multimodal.tiny import TEXTS, build_tiny_vlm


def packed_batch(model):
    per_image = model.num_image_tokens
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index, (before, answer) in enumerate([(3, 5), (1, 12), (4, 2)]):
        ids = [200] * before + [model.image_token_id] * per_image + [300 + index] * answer
        labels = [-100] * (before + per_image) + ids[before + per_image:]
        samples.append(TokenizedSample(f"s{index}", ids, labels, [torch.randn(3, 32, 32, generator=generator)]))
    rows = [samples[:2], samples[2:]]
    return make_batch(rows, max_tokens=max(sum(len(s) for s in row) for row in rows) + 3, pad_id=0)


@pytest.mark.parametrize("attention", ["sdpa", "auto"])
def test_training_step_has_no_host_sync(attention):
    model = build_tiny_vlm(train_tokenizer(TEXTS, vocab_size=420)).train()
    model.decoder.config.attention = attention
    batch = packed_batch(model)
    cpu_loss, _ = model(batch)
    model.cuda()
    gpu_batch = batch.to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = model(gpu_batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss.cpu(), cpu_loss.detach(), atol=1e-4, rtol=1e-4)
