"""Sharded training: FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning, on GPUs or on CPU
ranks (gloo).

`--trainer.strategy fsdp2` (or `class_path: multimodal.parallel.FSDP2Strategy` with its options)
shards every unit the model names (VisionLanguageModel.fsdp_units: each encoder block, the encoder
stem, the token embedding, each decoder block) over all ranks, and the model itself last (the root:
projector, newline, final norm, output head). Weights, gradients and AdamW states are split
across ranks; a unit's weights are gathered just before it runs and freed after.

What this module makes sure of, because FSDP2 itself does not:
- every rank starts from the same weights (FSDP2 broadcasts nothing; each rank keeps its slice of
  its own tensor): checked before sharding, naming the first tensor that differs;
- every rank joins the same collectives in every micro-batch: the model encodes a blank image in
  a micro-batch without images (VisionLanguageModel.always_encode);
- checkpoints are written atomically: a sharded checkpoint is a directory (one file per rank,
  `meta.pt` with the step, schedule and data positions); it is written under a temporary name and
  renamed when every rank has finished, so a kill during a save leaves the previous one whole;
- the export at the end of training gathers the full weights on every rank (a collective) before
  rank 0 writes them (VLMModule.on_train_end).

Mixed precision is a policy, not autocast: `param_dtype: bf16` computes with bf16 copies of the
gathered weights and reduces gradients in fp32 (`reduce_dtype`), with the trainer's precision left
at `32-true` (autocast would keep a bf16 copy of every weight until the forward ends). On CPU the
default is fp32. `hsdp: true` shards within a node and replicates across nodes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Generator, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from multimodal.checkpoint_io import fsync_directory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


class WeightsDiffer(RuntimeError):
    """Ranks hold different weights before sharding."""


def weight_fingerprints(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and a [tensors, 2] float64 (sum, sum of squares) of every parameter and buffer."""
    names, rows = [], []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        values = tensor.detach().to(torch.float64)
        names.append(name)
        rows.append(torch.stack([values.sum(), values.square().sum()]))
    return names, torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def check_identical_weights(model: nn.Module, group: Any = None) -> None:
    """WeightsDiffer (on every rank, so none waits for the others) when the ranks' weights differ;
    the message names the first tensor that does and the ranks."""
    import torch.distributed as dist

    names, mine = weight_fingerprints(model)
    ranks = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(ranks)]
    dist.all_gather(gathered, mine, group=group)
    for rank, theirs in enumerate(gathered[1:], start=1):
        differs = ~((theirs == gathered[0]) | (theirs.isnan() & gathered[0].isnan())).all(dim=1)
        if bool(differs.any()):
            first = names[int(differs.nonzero()[0])]
            raise WeightsDiffer(
                f"rank {rank} starts from other weights than rank 0 ({int(differs.sum())} of {len(names)} tensors "
                f"differ, the first: {first!r}). Sharded training splits each rank's own tensors and broadcasts "
                "nothing: give every rank the same seed (seed_everything) or the same init_from weights.")


def shard_model(model: nn.Module, mesh: Any, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None,
                force_sum_reduction: bool = False) -> None:
    """fully_shard each of model.fsdp_units(), then the model (the root), with one mixed-precision
    policy; afterwards every parameter is a DTensor (gradient clipping needs all or none)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in model.fsdp_units():
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if force_sum_reduction:
        # gloo's AVG reduction was reported to sum (pytorch#162338): sum explicitly and let FSDP
        # divide, which gives the same bits where AVG is right.
        for module in fsdp_modules(model):
            module.set_force_sum_reduction_for_comms(True)
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(f"parameters left unsharded: {plain[:5]}")
    model.always_encode = True


def fsdp_modules(module: nn.Module) -> Iterable[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return (m for m in module.modules() if isinstance(m, FSDPModule))


def is_sharded(module: nn.Module) -> bool:
    return next(iter(fsdp_modules(module)), None) is not None


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A complete sharded checkpoint: a directory with its meta.pt (written last)."""
    return (Path(path) / META_FILE).is_file()


def replace_directory(partial: Path, path: Path) -> None:
    """Put the finished `partial` directory at `path`: a rename, so that `path` is always either the
    old checkpoint or the new one, never part of one. An existing `path` is moved aside first and
    removed after."""
    aside = None
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(aside)
    partial.rename(path)
    fsync_directory(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def partial_name(path: Path, token: str) -> Path:
    return path.with_name(f".{path.name}.partial-{token}")


def remove_stale_partial_dirs(directory: Path, keep: Path | None = None) -> list[str]:
    """Remove the temporary directories that killed saves left in `directory` (a run saves one
    checkpoint at a time, so any other one is dead)."""
    removed = []
    for leftover in directory.glob(".*.partial-*"):
        if leftover.is_dir() and leftover != keep:
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(str(leftover))
    return removed


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every rank (Lightning's ModelParallelStrategy with a pure data-parallel mesh),
    sharding the model's own units (multimodal.parallel module docstring).

    param_dtype: the dtype units compute in ("auto": bf16 on CUDA, fp32 elsewhere);
    reduce_dtype: the dtype gradients are reduced in;
    hsdp: shard within each node and replicate across nodes (a 2-D mesh: less traffic between
      nodes, more memory per GPU);
    encoder_checkpointing: recompute encoder blocks in backward (decoder blocks follow
      stage.gradient_checkpointing).
    Sharded checkpoints are directories, written atomically; `salamandra-vl consolidate` turns one
    into a save_pretrained directory.
    """

    strategy_name = "fsdp2"

    def __init__(self, param_dtype: Literal["auto", "bf16", "fp32"] = "auto",
                 reduce_dtype: Literal["fp32", "bf16"] = "fp32", hsdp: bool = False,
                 encoder_checkpointing: bool = False, process_group_backend: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, **kwargs)
        if param_dtype not in ("auto", *DTYPES) or reduce_dtype not in DTYPES:
            raise ValueError(f"param_dtype must be auto, bf16 or fp32 and reduce_dtype bf16 or fp32; got "
                             f"{param_dtype!r}, {reduce_dtype!r}")
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.hsdp, self.encoder_checkpointing = hsdp, encoder_checkpointing

    def setup_environment(self) -> None:
        # Pure data parallelism: one data-parallel group of all ranks (Lightning's "auto" would make
        # it one rank per node and the rest tensor-parallel).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard_mesh(self) -> Any:
        if not self.hsdp:
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.root_device.type, (self.num_nodes, self.num_processes),
                                mesh_dim_names=("replicate", "shard"))

    def compute_dtype(self) -> torch.dtype | None:
        if self.param_dtype == "auto":
            return torch.bfloat16 if self.root_device.type == "cuda" else None
        return None if self.param_dtype == "fp32" else DTYPES[self.param_dtype]

    def shard(self, model: nn.Module) -> None:
        """Check that all ranks hold the same weights, then shard `model` (a VisionLanguageModel)
        in place on this rank's device."""
        if self.precision_plugin.precision not in ("32-true", "32"):
            raise ValueError(f"the fsdp2 strategy computes in param_dtype ({self.param_dtype}); set trainer.precision "
                             f"32-true instead of {self.precision_plugin.precision} (autocast would keep a second "
                             "copy of every weight)")
        if model.lora is not None:
            raise ValueError("LoRA adapters are not supported under the fsdp2 strategy yet; use ddp (with LoRA "
                             "the optimizer states are small: the full weights are what each GPU holds)")
        model.to(self.root_device)
        check_identical_weights(model)
        model.encoder.gradient_checkpointing = self.encoder_checkpointing
        shard_model(model, self.shard_mesh(), self.compute_dtype(), DTYPES[self.reduce_dtype],
                    force_sum_reduction=torch.distributed.get_backend() == "gloo")

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Accumulating micro-batches: FSDP must reduce-scatter every micro-batch's gradients (each
        # rank keeps only its shard), but under HSDP the all-reduce across nodes can wait for the last.
        modules = list(fsdp_modules(self.model)) if self.hsdp and self.model is not None else []
        for module in modules:
            module.set_requires_all_reduce(False, recurse=False)
        try:
            yield
        finally:
            for module in modules:
                module.set_requires_all_reduce(True, recurse=False)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        partial = partial_name(path, self.broadcast(uuid.uuid4().hex[:12]))
        if self.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partial_dirs(path.parent)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every rank's shard file is complete (and fsynced by torch's writer)
        if self.is_global_zero:
            replace_directory(partial, path)
        self.barrier()

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)


StrategyRegistry.register(FSDP2Strategy.strategy_name, FSDP2Strategy,
                          description="FSDP2 sharding of the VLM's blocks (multimodal.parallel)")
