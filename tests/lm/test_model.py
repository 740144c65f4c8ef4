"""The decoder against Hugging Face's LlamaForCausalLM holding the same weights."""

import math

import pytest
import torch
import transformers

from lm import Decoder, KVCache, LMConfig, SeqLayout
from lm.model import rotary_cos_sin
from tests.numerics import assert_close_scaled


def small_config(kv_heads: int) -> LMConfig:
    return LMConfig(vocab_size=300, n_layers=3, d_model=64, n_heads=4, n_kv_heads=kv_heads, d_ff=96,
                    max_seq_len=128, norm_eps=1e-5, rope_theta=10_000.0, attention="sdpa")


def hf_twin(decoder: Decoder) -> transformers.LlamaForCausalLM:
    """An HF Llama with the same shapes and weights, using HF's own eager attention as the reference."""
    c = decoder.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(decoder.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


@pytest.fixture(params=[4, 2, 1], ids=["mha", "gqa", "mqa"])
def pair(request):
    torch.manual_seed(0)
    decoder = Decoder(small_config(request.param)).eval()
    return decoder, hf_twin(decoder)


def test_parameter_names_are_hugging_face_names(pair):
    decoder, hf = pair
    assert set(decoder.state_dict()) == set(hf.state_dict())


@torch.no_grad()
def test_logits_equal_hugging_face(pair):
    decoder, hf = pair
    ids = torch.randint(0, 300, (2, 17))
    ours = decoder(ids)
    theirs = hf(input_ids=ids).logits
    assert ours.shape == (2, 17, 300)
    # Our SDPA against HF's eager attention: other kernels, other summation orders, so the
    # tolerance is relative to the logits' size (assert_close_scaled) here and below.
    assert_close_scaled(ours, theirs, rel=1e-5)


@torch.no_grad()
def test_inputs_embeds_and_explicit_positions(pair):
    decoder, hf = pair
    ids = torch.randint(0, 300, (1, 9))
    positions = torch.arange(5, 14)[None]
    ours = decoder(inputs_embeds=decoder.embed(ids), position_ids=positions)
    theirs = hf(input_ids=ids, position_ids=positions).logits
    assert_close_scaled(ours, theirs, rel=1e-5)


@torch.no_grad()
def test_packed_rows_equal_each_sample_alone(pair):
    decoder, hf = pair
    lengths = [[5, 8, 3], [11, 7]]
    row_len = 18  # row 0 has 2 tokens of padding at its end
    samples = [[torch.randint(0, 300, (n,)) for n in row] for row in lengths]
    rows = torch.zeros(2, row_len, dtype=torch.long)
    for r, row in enumerate(samples):
        flat = torch.cat(row)
        rows[r, : len(flat)] = flat
    logits = decoder(rows, layout=SeqLayout.packed(lengths))
    for r, row in enumerate(samples):
        start = 0
        for sample in row:
            alone = hf(input_ids=sample[None]).logits[0]
            assert_close_scaled(logits[r, start : start + len(sample)], alone, rel=1e-5)
            start += len(sample)


def test_packed_layout_positions_and_errors():
    layout = SeqLayout.packed([[2, 3], [4]])
    assert layout.position_ids(2, 6).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]
    with pytest.raises(ValueError, match="sum to 7 > row length 6"):
        SeqLayout.packed([[3, 4]]).position_ids(1, 6)
    with pytest.raises(ValueError, match="non-positive"):
        SeqLayout.packed([[3, 0]])
    with pytest.raises(ValueError, match="2 rows but the batch has 1"):
        SeqLayout.packed([[1], [1]]).segments(1, 4)


@torch.no_grad()
def test_kv_cache_incremental_decoding_equals_full_forward(pair):
    decoder, _ = pair
    ids = torch.randint(0, 300, (2, 12))
    full = decoder(ids)
    cache = KVCache.allocate(decoder.config, batch=2, max_tokens=16)
    steps = [decoder(ids[:, :7], cache=cache)]
    for t in range(7, 12):
        steps.append(decoder(ids[:, t : t + 1], cache=cache))
    assert_close_scaled(torch.cat(steps, dim=1), full, rel=1e-5)
    assert cache.length == 12


@torch.no_grad()
def test_kv_cache_left_padded_prompts_equal_each_prompt_alone(pair):
    decoder, hf = pair
    prompts = [torch.randint(0, 300, (n,)) for n in (4, 9)]
    width = 9
    ids = torch.zeros(2, width, dtype=torch.long)
    cache = KVCache.allocate(decoder.config, batch=2, max_tokens=12)
    positions = torch.zeros(2, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        cache.valid[r, : width - len(p)] = False
        positions[r, width - len(p):] = torch.arange(len(p))
    first = decoder(ids, position_ids=positions, cache=cache)
    nxt = torch.tensor([[7], [8]])
    second = decoder(nxt, position_ids=torch.tensor([[4], [9]]), cache=cache)
    for r, p in enumerate(prompts):
        alone = hf(input_ids=torch.cat([p, nxt[r]])[None]).logits[0]
        assert_close_scaled(first[r, width - len(p):], alone[:-1], rel=1e-5)
        assert_close_scaled(second[r, 0], alone[-1], rel=1e-5)
    assert torch.isfinite(first).all()


def test_kv_cache_overflow_and_packed_refused():
    decoder = Decoder(small_config(2))
    cache = KVCache.allocate(decoder.config, batch=1, max_tokens=4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        decoder(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="plain rows"):
        decoder(torch.zeros(1, 4, dtype=torch.long), cache=cache, layout=SeqLayout.packed([[4]]))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    decoder = Decoder(small_config(2)).train()
    ids = torch.randint(0, 300, (2, 10))
    grads = []
    for checkpointing in (False, True):
        decoder.zero_grad()
        decoder.gradient_checkpointing = checkpointing
        decoder(ids).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in decoder.named_parameters()})
    for name in grads[0]:
        assert_close_scaled(grads[1][name], grads[0][name], rel=1e-5, msg=name)


def test_xformers_refused_on_cpu():
    decoder = Decoder(LMConfig.from_name("tiny", attention="xformers"))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        decoder(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("name, count", [("salamandra-2b", 2_253_490_176), ("salamandra-7b", 7_768_117_248)])
def test_preset_parameter_counts_equal_published(name, count):
    with torch.device("meta"):
        decoder = Decoder(LMConfig.from_name(name))
    assert sum(p.numel() for p in decoder.parameters()) == count


def test_presets_carry_published_shapes():
    c = LMConfig.from_name("salamandra-7b")
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size) == (
        32, 4096, 32, 8, 128, 11008, 256_000)
    assert not c.tie_embeddings and c.rope_theta == 10_000.0
    assert LMConfig.from_name("salamandra-2b").init_std == 0.014
    with pytest.raises(KeyError, match="unknown LM preset"):
        LMConfig.from_name("salamandra-3b")
    with pytest.raises(ValueError, match="not a multiple"):
        LMConfig.from_name("tiny", n_kv_heads=3)


def test_init_std_and_residual_scaling():
    torch.manual_seed(0)
    config = LMConfig(vocab_size=2000, n_layers=8, d_model=256, n_heads=4, n_kv_heads=4, d_ff=512, init_std=0.02)
    decoder = Decoder(config)
    block = decoder.model.layers[0]
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert decoder.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.02)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert block.self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.02)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.02)
    assert torch.equal(block.input_layernorm.weight, torch.ones(256))


@torch.no_grad()
def test_auto_backend_is_sdpa_on_cpu_with_equal_numbers():
    torch.manual_seed(0)
    auto = Decoder(LMConfig.from_name("tiny", attention="auto")).eval()
    sdpa = Decoder(LMConfig.from_name("tiny", attention="sdpa")).eval()
    sdpa.load_state_dict(auto.state_dict())
    ids = torch.randint(0, 512, (2, 9))
    layout = SeqLayout.packed([[4, 5], [9]])
    torch.testing.assert_close(auto(ids, layout=layout), sdpa(ids, layout=layout), atol=0, rtol=0)


def test_meta_construction_then_init_weights_gives_a_working_model():
    # The route of sharded training: build on meta, materialize, initialize.
    with torch.device("meta"):
        decoder = Decoder(small_config(2))
    decoder.to_empty(device="cpu")
    decoder.init_weights()
    reference = hf_twin(decoder)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert_close_scaled(decoder(ids), reference(input_ids=ids).logits, rel=1e-5)


@torch.no_grad()
def test_bf16_rotary_tables_equal_hugging_face_at_long_positions(tmp_path):
    # Frequencies stay fp32 whatever the model dtype (a bf16 copy would be off by radians at 8k).
    torch.manual_seed(0)
    decoder = Decoder(small_config(2)).eval()
    hf_twin(decoder).save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    positions = torch.arange(8000, 8016)[None]
    x = torch.zeros(1, 16, 64, dtype=torch.bfloat16)
    hf_cos, hf_sin = hf.model.rotary_emb(x, positions)
    cos, sin = rotary_cos_sin(positions, 16, 10_000.0, torch.bfloat16)
    assert torch.equal(cos[:, :, 0], hf_cos) and torch.equal(sin[:, :, 0], hf_sin)
    assert not any(b.is_floating_point() for b in decoder.to(torch.bfloat16).buffers())


def test_bad_inputs_get_clear_errors():
    decoder = Decoder(small_config(2))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\]"):
        decoder(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must be \[1, 4\]"):
        decoder(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="exceed the model's max_seq_len 128"):
        decoder(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, tokens, 64\]"):
        decoder(inputs_embeds=torch.zeros(1, 4, 65))
    cache = KVCache.allocate(decoder.config, batch=1, max_tokens=8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="KV cache is torch.bfloat16"):
        decoder(torch.zeros(1, 4, dtype=torch.long), cache=cache)
