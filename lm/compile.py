"""Optional `torch.compile` of the decoder blocks, in place.

Each `Block` is compiled on its own (`nn.Module.compile`), so the module tree, parameter names,
state dicts, FSDP wrapping per block and gradient checkpointing (which calls the block) all stay as
they are: only what runs inside a block changes. The 24 or more blocks share one code object and
take their weights as inputs, so the compiler builds one graph for all of them, not one per block.

The attention call itself stays outside the compiled graphs: a packed `SeqLayout` carries each
row's sample lengths as Python numbers, and a graph traced through them would be specialized to one
packing and recompiled for every new batch (`lm.attention.causal_attention` is marked
opaque to the compiler). So each block compiles into two graphs (norm, q/k/v,
rotary before attention; output projection, residual, norm and SwiGLU after it) around eager
attention (xformers' block-diagonal kernel or SDPA), which is also where the compiler has nothing
to gain.
"""

from __future__ import annotations

from typing import Any


from lm.model import Decoder

__all__ = ["compile_blocks"]


def compile_blocks(decoder: Decoder, **options: Any) -> Decoder:
    """Compile every block of `decoder` in place with `torch.compile(**options)` (e.g.
    `backend="inductor"`, `mode="max-autotune-no-cudagraphs"`, `dynamic=None`) and return it.

    Logits and gradients equal eager mode's within float rounding; the embedding, final norm and
    output head stay eager (the loss computes the head chunk by chunk). Calling it twice is harmless.
    CUDA graphs ("reduce-overhead", "max-autotune") need static inputs: avoid them for training with
    packed rows of varying layout.
    """
    if not isinstance(decoder, Decoder):
        raise TypeError(f"compile_blocks expects an lm.Decoder, got {type(decoder).__name__}")
    for block in decoder.model.layers:
        block.compile(**options)
    return decoder
