"""Read and write Hugging Face `LlamaForCausalLM` checkpoint directories (safetensors only).

A directory holds `config.json` and either `model.safetensors` or sharded files listed by
`model.safetensors.index.json`. Pickled weights (`pytorch_model.bin`) are refused: loading them can
run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lm.config import LMConfig
from lm.model import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def config_from_hf(hf: dict) -> LMConfig:
    """LMConfig from a Hugging Face Llama config.json dict; refuses what the decoder does not implement."""
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in (hf.get("architectures") or []):
        raise ValueError(
            f"not a Llama checkpoint: model_type={hf.get('model_type')!r}, "
            f"architectures={hf.get('architectures')!r}"
        )
    for field in ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        if field not in hf:
            raise ValueError(f"config.json lacks the field {field!r}")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
    }
    for field, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"config.json field {field!r} is {value!r}; only {wanted!r} is supported")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"config.json asks for rope scaling {rope_type!r}; only unscaled rotary embeddings are supported")
    heads = hf["num_attention_heads"]
    if hf["hidden_size"] % heads:
        raise ValueError(f"config.json: hidden_size {hf['hidden_size']} is not divisible by num_attention_heads {heads}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ValueError(f"config.json field 'head_dim' is {head_dim}; only hidden_size / num_attention_heads is supported")
    return LMConfig(
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 8192),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def config_to_hf(config: LMConfig, dtype: torch.dtype) -> dict:
    """The config.json of a LlamaForCausalLM, in the layout the released Salamandra checkpoints use."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint directory: `model.safetensors`, or the shards
    `model.safetensors.index.json` lists. FileNotFoundError when neither is there (pickled
    weights are refused, not read) or a listed shard is missing."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {pickled}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(f"{INDEX_FILE} lists the shard {name}, which is missing from {directory}")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def load_decoder(
    directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    **config_overrides,
) -> Decoder:
    """A Decoder holding the weights of a Hugging Face Llama checkpoint directory.

    The model is built on the meta device and the checkpoint's tensors are assigned in place, so a
    7B model never holds a second, randomly initialized copy. `dtype` defaults to the checkpoint's.
    `config_overrides` set LMConfig fields the checkpoint does not carry (e.g. `attention="sdpa"`).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    config = dataclasses.replace(config_from_hf(json.loads(config_path.read_text())), **config_overrides)
    tensors = read_safetensors(directory)
    # Older exports carry the rotary frequencies as a buffer; they are derived from the config here.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        decoder = Decoder(config)
    expected = {name: p.shape for name, p in decoder.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match its config.json: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"checkpoint key {name!r} has shape {tuple(tensors[name].shape)}; "
                             f"config.json implies {tuple(shape)}")
    dtype = dtype or next(iter(tensors.values())).dtype
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    decoder.load_state_dict(tensors, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
    return decoder


def save_decoder(decoder: Decoder, directory: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a directory that `transformers.LlamaForCausalLM.from_pretrained` loads; shards above
    `max_shard_bytes`, with a `model.safetensors.index.json`, as Hugging Face does."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in decoder.state_dict().items()}
    if decoder.config.tie_embeddings:
        state.pop("lm_head.weight")  # safetensors refuses shared storage; HF re-ties on load
    dtype = next(iter(state.values())).dtype
    (directory / "config.json").write_text(json.dumps(config_to_hf(decoder.config, dtype), indent=2) + "\n")

    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    write_safetensors(state, directory, max_shard_bytes)


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """`state` as Hugging Face lays it out: one `model.safetensors`, or shards of at most
    `max_shard_bytes` (a tensor larger than that gets a shard of its own) with a
    `model.safetensors.index.json` mapping each tensor to its shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
