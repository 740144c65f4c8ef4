"""LoRA adapters (peft) on the decoder's attention and MLP projections, and optionally on the encoder
blocks' linear layers: the adapted modules' own weights stay frozen and only the low-rank adapters
learn (besides the modules a stage trains whole, e.g. the projector).

Saved apart from the weights, in peft's own files beside the model's config (`adapter_config.json`,
`adapter_model.safetensors`): `save_pretrained` writes the base weights under their usual names and
the adapters there; `from_pretrained` puts them back. `merge_lora` folds them into the weights
(`salamandra-vl merge`), which `export` does first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """r: the adapters' rank; alpha: their scale (the update is alpha / r x B A); dropout on their
    input; targets: the decoder projections adapted (by name, in every block); encoder: also adapt
    every linear layer of the encoder's blocks."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DECODER_TARGETS))
    encoder: bool = False

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs r >= 1, alpha > 0 and dropout in [0, 1); got {self.r}, {self.alpha}, "
                             f"{self.dropout}")
        unknown = sorted(set(self.targets) - set(DECODER_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be among {DECODER_TARGETS}, got {self.targets}")

    @property
    def modules(self) -> tuple[str, ...]:
        """The VisionLanguageModel parts that carry adapters."""
        return ("decoder", "encoder") if self.encoder else ("decoder",)


def target_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The full names of the nn.Linear modules to adapt."""
    names = []
    for index, block in enumerate(model.decoder.model.layers):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name.split(".")[-1] in settings.targets:
                names.append(f"decoder.model.layers.{index}.{name}")
    if settings.encoder:
        prefix = next(name for name, module in model.named_modules() if module is model.encoder.blocks)
        for name, module in model.encoder.blocks.named_modules():
            if isinstance(module, nn.Linear):
                names.append(f"{prefix}.{name}")
    return names


def peft_config(model: nn.Module, settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=target_names(model, settings))


def add_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Inject freshly initialised adapters (B = 0: the model computes exactly what it did) into
    `model`, a VisionLanguageModel; which parameters learn is the stage's business (apply_stage)."""
    from peft import inject_adapter_in_model

    if model.lora is not None:
        raise ValueError("the model already has LoRA adapters")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    inject_adapter_in_model(peft_config(model, settings), model)
    # peft freezes every other parameter; put back what the caller had.
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(trainable.get(name.replace(".base_layer", ""), p.requires_grad))
    model.lora = settings


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without its adapters, under the names they have without LoRA."""
    return {name.replace(".base_layer", ""): tensor for name, tensor in model.state_dict().items()
            if not is_adapter(name)}


def save_adapters(model: nn.Module, directory: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(model, model.lora).to_dict()
    config["salamandra_vision"] = asdict(model.lora)  # our settings, to rebuild exactly these adapters
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=list) + "\n")


def load_adapters(model: nn.Module, directory: Path) -> None:
    """Adapters saved by save_adapters, into `model` (built from the same directory's weights)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config: dict[str, Any] = json.loads((directory / ADAPTER_CONFIG).read_text())
    settings = LoraSettings(**config["salamandra_vision"])
    add_lora(model, settings)
    result = set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))
    missing = [k for k in result.missing_keys if is_adapter(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: adapters do not match the model (missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]})")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and put the plain layer back: the same function,
    no adapters left (model.lora None)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in layers:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    model.lora = None
    return model
