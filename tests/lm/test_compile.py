"""compile_blocks: a compiled decoder computes what the eager one does, on plain and packed rows,
with and without gradient checkpointing, and a new packing does not trigger a recompile.

The CPU test uses the aot_eager backend (Dynamo + AOTAutograd, no code generation): it checks the
graph capture, the autograd split and the packed-layout handling; inductor's kernels are a GPU
benchmark's business (benchmarks/gpu.py --compile).
"""

import pytest
import torch
import torch._dynamo

from lm import Decoder, LMConfig, SeqLayout, compile_blocks
from tests.numerics import assert_close_scaled


@pytest.fixture
def decoders():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = LMConfig.from_name("tiny", attention="sdpa")
    eager = Decoder(config)
    compiled = Decoder(config)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, backend="aot_eager")
    yield eager, compiled
    torch._dynamo.reset()


def run(decoder, ids, layout):
    decoder.zero_grad(set_to_none=True)
    logits = decoder(ids, layout=layout)
    # A loss that weights every logit differently, so any wrong gradient entry shows.
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in decoder.named_parameters()}


LAYOUTS = [
    SeqLayout(),
    SeqLayout.packed([[5, 11, 8], [20]]),        # the second row ends in 4 padding tokens
    SeqLayout.packed([[3, 21], [7, 7, 7, 3]]),
]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_eager(decoders, checkpointing):
    eager, compiled = decoders
    eager.gradient_checkpointing = compiled.gradient_checkpointing = checkpointing
    generator = torch.Generator().manual_seed(1)
    for layout in LAYOUTS:
        ids = torch.randint(0, eager.config.vocab_size, (2, 24), generator=generator)
        logits, grads = run(eager, ids, layout)
        logits_c, grads_c = run(compiled, ids, layout)
        # Tolerances relative to each tensor's largest entry: the embedding gradient reaches ~260,
        # and another summation order (AMD, AVX2, default kernels) moves its near-zero entries by
        # ~1e-7 of that, beyond any element-wise atol that still means something.
        assert_close_scaled(logits_c, logits, rel=1e-5, msg="logits")
        assert grads.keys() == grads_c.keys()
        for name in grads:
            assert_close_scaled(grads_c[name], grads[name], rel=1e-5, msg=name)
    # The blocks really ran compiled code.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_new_packing_reuses_the_compiled_graphs(decoders):
    _, compiled = decoders
    ids = torch.randint(0, compiled.config.vocab_size, (2, 24))
    for layout in LAYOUTS:
        run(compiled, ids, layout)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for layout in (SeqLayout.packed([[1, 2, 3, 18], [12, 12]]), SeqLayout.packed([[23], [2, 22]])):
        run(compiled, ids, layout)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_state_dict_names_are_unchanged(decoders):
    eager, compiled = decoders
    assert list(compiled.state_dict()) == list(eager.state_dict())
    with pytest.raises(TypeError, match="lm.Decoder"):
        compile_blocks(torch.nn.Linear(2, 2))
