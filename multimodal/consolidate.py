"""`salamandra-vl consolidate CKPT_DIR OUT_DIR`: a sharded checkpoint of the fsdp2 strategy (a
directory of per-rank files and meta.pt) -> the save_pretrained format, in one process, without a
process group: the architecture comes from the model settings saved in meta.pt, the weights are
read from the shards and joined (the optimizer state is not read). A 7B model needs about 33 GB of
memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from multimodal.export import check_out_dir
from multimodal.parallel import META_FILE, is_checkpoint_dir
from multimodal.training import ModelSpec, build_model


def read_meta(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint (step, hyperparameters, data positions);
    ValueError for a directory that is not a complete one."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_checkpoint_dir(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} is not a complete sharded checkpoint (a directory with {META_FILE}); "
                         "an interrupted save leaves only a hidden .*.partial-* directory, never this name")
    return torch.load(checkpoint_dir / META_FILE, map_location="cpu", weights_only=True)


def consolidate(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    meta = read_meta(checkpoint_dir)
    settings = meta.get("hyper_parameters", {}).get("model")
    if not settings:
        raise ValueError(f"{checkpoint_dir}/{META_FILE} holds no model settings: not written by salamandra-vl fit")
    model = build_model(ModelSpec(**settings))
    # VLMModule holds the model as `model`; the checkpoint's tensors are named from there. A tied
    # output head is the embedding (one tensor, saved once).
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()
             if not (model.decoder.config.tie_embeddings and name == "decoder.lm_head.weight")}
    dcp.load({"state_dict": state}, checkpoint_id=str(checkpoint_dir), no_dist=True)
    model.load_state_dict({name.removeprefix("model."): tensor for name, tensor in state.items()},
                          strict=not model.decoder.config.tie_embeddings)
    model.save_pretrained(out_dir)
    return out_dir
