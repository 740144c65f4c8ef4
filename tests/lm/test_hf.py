"""Hugging Face checkpoint directories, both ways, checked with transformers itself."""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from lm import Decoder, LMConfig, load_decoder, save_decoder
from tests.numerics import assert_close_scaled

CONFIG = LMConfig(vocab_size=320, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96,
                  max_seq_len=64, norm_eps=1e-6, rope_theta=5_000.0, attention="sdpa")


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    return Decoder(CONFIG).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 320, (2, 11))


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 60_000], ids=["single", "sharded"])
@torch.no_grad()
def test_saved_decoder_loads_in_transformers(decoder, ids, tmp_path, max_shard_bytes):
    save_decoder(decoder, tmp_path, max_shard_bytes=max_shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 2**20)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_theta"] == 5_000.0
    # transformers' eager attention against our SDPA: tolerance relative to the logits' size.
    assert_close_scaled(hf(input_ids=ids).logits, decoder(ids), rel=1e-5)
    reloaded = load_decoder(tmp_path)
    for name, tensor in decoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("max_shard_size", [None, "50KB"], ids=["single", "sharded"])
@torch.no_grad()
def test_transformers_checkpoint_loads_with_load_decoder(ids, tmp_path, max_shard_size):
    torch.manual_seed(1)
    hf_config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5_000.0, max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(max_shard_size)
    ours = load_decoder(tmp_path, attention="sdpa")
    assert ours.config.rope_theta == 5_000.0 and ours.config.n_kv_heads == 2
    assert_close_scaled(ours(ids), hf(input_ids=ids).logits, rel=1e-5)


def test_load_casts_dtype(decoder, tmp_path):
    save_decoder(decoder.to(torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_decoder(tmp_path).lm_head.weight.dtype == torch.bfloat16
    assert load_decoder(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_not_a_llama_checkpoint(decoder, tmp_path):
    save_decoder(decoder, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a Llama checkpoint: model_type='gpt2'"):
        load_decoder(tmp_path)


def test_unsupported_config_field_is_named(decoder, tmp_path):
    save_decoder(decoder, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling 'llama3'"):
        load_decoder(tmp_path)


def test_shape_mismatch_names_the_key(decoder, tmp_path):
    save_decoder(decoder, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\); config.json implies \(128, 64\)"):
        load_decoder(tmp_path)


def test_missing_and_unexpected_keys_are_named(decoder, tmp_path):
    state = {k: v.contiguous() for k, v in decoder.state_dict().items()}
    state["model.extra.weight"] = state.pop("model.norm.weight")
    save_decoder(decoder, tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\].*unexpected keys \['model.extra.weight'\]"):
        load_decoder(tmp_path)


def test_missing_shard_and_pickles_refused(decoder, tmp_path):
    save_decoder(decoder, tmp_path, max_shard_bytes=60_000)
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="lists the shard model-00002"):
        load_decoder(tmp_path)
    other = tmp_path / "pickled"
    other.mkdir()
    (other / "config.json").write_text((tmp_path / "config.json").read_text())
    torch.save(decoder.state_dict(), other / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
        load_decoder(other)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_decoder(tmp_path / "nowhere")


@torch.no_grad()
def test_tied_embeddings_round_trip(ids, tmp_path):
    torch.manual_seed(2)
    decoder = Decoder(LMConfig.from_name("tiny", tie_embeddings=True, attention="sdpa")).eval()
    assert decoder.lm_head.weight is decoder.model.embed_tokens.weight
    save_decoder(decoder, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 512, (1, 6))
    assert_close_scaled(hf(input_ids=ids).logits, decoder(ids), rel=1e-5)
    reloaded = load_decoder(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded(ids), decoder(ids), atol=0, rtol=0)
