"""The placeholder check that runs on accelerators (a device-side condition, no host synchronisation)
accepts exactly the batches that the detailed CPU check accepts."""

import random

import pytest
import torch

from lm.attention import SeqLayout
from multimodal.model import _placeholder_run_starts, _placeholders_match


def random_case(rng: random.Random, image_token: int, per_image: int, varied: bool = False):
    """A packed batch of runs of placeholders, mostly right, sometimes one short or long, sometimes
    cut by a sample boundary, with the right number of images or one off. Returns the images' token
    counts: all `per_image`, or (varied, as in the anyres layout) each its own."""
    rows, seq_lens, counts = [], [], []
    for _ in range(rng.randint(1, 3)):
        row, lens = [], []
        for _ in range(rng.randint(1, 3)):
            sample = [1] * rng.randint(0, 3)
            for _ in range(rng.randint(0, 2)):
                count = per_image + (rng.randint(-2, 3) if varied else 0)
                length = count + rng.choice([0, 0, 0, -1, 1])
                sample += [image_token] * length + [1] * rng.randint(0, 2)
                counts.append(count)
            sample = sample or [1]
            row += sample
            lens.append(len(sample))
        rows.append(row)
        seq_lens.append(lens)
    tokens = max(len(row) for row in rows) + rng.randint(0, 2)
    ids = torch.tensor([row + [0] * (tokens - len(row)) for row in rows])
    change = rng.choice([0, 0, 0, -1, 1])
    counts = counts[:-1] if change < 0 else counts + [per_image] if change > 0 else counts
    return ids, counts, SeqLayout.packed(seq_lens)


@pytest.mark.parametrize("varied", [False, True], ids=["same_counts", "varied_counts"])
@pytest.mark.parametrize("seed", range(3))
def test_device_check_accepts_what_the_cpu_check_accepts(vlm, seed, varied):
    rng = random.Random(seed)
    per_image = vlm.num_image_tokens
    verdicts = set()
    for _ in range(150):
        ids, counts, layout = random_case(rng, vlm.image_token_id, per_image, varied)
        is_image = ids == vlm.image_token_id
        try:
            vlm._check_placeholders(is_image, counts, layout)
            cpu_accepts = True
        except ValueError:
            cpu_accepts = False
        starts = _placeholder_run_starts(is_image, layout)
        device_accepts = bool(_placeholders_match(is_image, starts, torch.tensor(counts, dtype=torch.long)))
        assert device_accepts == cpu_accepts, (ids.tolist(), counts, layout)
        verdicts.add(cpu_accepts)
    assert verdicts == {True, False}  # both kinds of batch were tried


def test_device_check_raises_through_assert_async(vlm):
    """What an accelerator would do, on CPU: the queued assertion raises with the message."""
    ids = torch.tensor([[1] + [vlm.image_token_id] * (vlm.num_image_tokens - 1) + [1]])
    is_image = ids == vlm.image_token_id
    ok = _placeholders_match(is_image, _placeholder_run_starts(is_image, None), torch.tensor([vlm.num_image_tokens]))
    with pytest.raises(RuntimeError, match="placeholders"):
        torch._assert_async(ok, "image placeholders do not match the images")
