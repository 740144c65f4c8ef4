"""lm reads a checkpoint directory laid out as the released Salamandra ones (tests/real_layout.py),
checked against transformers (AutoTokenizer, LlamaForCausalLM) and SentencePiece on the same files."""

import json

import jinja2
import pytest
import sentencepiece
import torch
import transformers
from transformers import AutoTokenizer

from lm import load_decoder, load_tokenizer
from lm.tokenizer import SPECIAL_TOKENS, render_chat_template
from tests.numerics import assert_close_scaled
from tests.real_layout import DEFAULT_SYSTEM_PROMPT, TEMPLATES, write_salamandra_checkpoint

SYSTEM = {"role": "system", "content": "Respon sempre en català, de manera breu."}
CONVERSATIONS = {
    "one-user-turn": [{"role": "user", "content": "Describe the image."}],
    "system-and-user": [SYSTEM, {"role": "user", "content": "Què hi ha a la imatge?"}],
    "multi-turn-es": [
        {"role": "user", "content": "¿Qué hay en la imagen?\nDescríbela con detalle."},
        {"role": "assistant", "content": "Dos gatos durmiendo en un sofá rojo.\n\nTambién hay una mesa de madera."},
        {"role": "user", "content": "¿Y de qué color es el sofá? Responde en español, por favor."},
    ],
    "multi-turn-ca-with-system": [
        SYSTEM,
        {"role": "user", "content": "Una col·lecció d'il·lustracions: quantes n'hi ha?"},
        {"role": "assistant", "content": "N'hi ha 27, de l'any 1999.\n- la ciutat\n- l'àvia i el nét"},
        {"role": "user", "content": "I a la finestra?\n"},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Hola!"},
        {"role": "assistant", "content": "Hola! En què et puc ajudar?"},
    ],
}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def checkpoint(request, tmp_path_factory):
    return request.param, write_salamandra_checkpoint(tmp_path_factory.mktemp(request.param), template=request.param)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return AutoTokenizer.from_pretrained(str(checkpoint[1]))


def hf_chat_ids(hf, messages, add_generation_prompt, **variables) -> list[int]:
    encoded = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **variables)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_the_fixture_has_the_real_layout(checkpoint):
    _, directory = checkpoint
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all((directory / shard).is_file() for shard in shards)
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer" and tokenizer_config["add_bos_token"] is True
    assert [tokenizer_config["added_tokens_decoder"][str(i)]["content"] for i in range(104)] == list(SPECIAL_TOKENS)
    tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
    assert [step["type"] for step in tokenizer_json["normalizer"]["normalizers"]] == ["Prepend", "Replace"]


def test_load_tokenizer_reads_the_directory(checkpoint, hf):
    name, directory = checkpoint
    ours = load_tokenizer(directory)
    assert ours.vocab_size == len(hf) == json.loads((directory / "config.json").read_text())["vocab_size"]
    assert ours.chat_template == TEMPLATES[name]
    assert [ours.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(104))
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(104))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)


@pytest.mark.parametrize("text", [
    "Una fotografía de dos gatos durmiendo en un sofá rojo.",
    "La guineu marró salta per sobre del gos mandrós, amb l'àvia i el nét.",
    "In 2024 the museum counted 31415 visitors.\nThen\n\ttabs and  double  spaces.",
    "Emoji and unseen scripts fall back to bytes: 🦎 ᚠᛇᚻ αλεπού",
])  # fmt: skip
def test_plain_text_ids_match_sentencepiece_and_transformers(checkpoint, hf, text):
    _, directory = checkpoint
    ours = load_tokenizer(directory)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    assert ours.encode(text) == processor.encode(text)  # the fixture's tokenizer.json is SentencePiece's model
    assert ours.encode(text, add_bos=True) == hf(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_chat_ids_match_transformers(checkpoint, hf, conversation, add_generation_prompt):
    name, directory = checkpoint
    ours = load_tokenizer(directory)
    messages = CONVERSATIONS[conversation]
    expected = hf_chat_ids(hf, messages, add_generation_prompt)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The directory's own template, rendered by us: always transformers' ids, BOS in front.
    assert render_chat_template(ours.chat_template, messages, add_generation_prompt) == text
    assert ours.apply_chat_template(messages, add_generation_prompt) == [1, *expected]
    assert ours.apply_chat_template(messages, add_generation_prompt) == hf(text)["input_ids"]
    # Plain ChatML (what training uses) is the template's rendering whenever the template adds nothing.
    has_system = messages[0]["role"] == "system"
    if name == "chatml" or has_system:
        assert ours.encode_chat(messages, add_generation_prompt) == [1, *expected]
    else:
        # The instruct template inserts its dated default system prompt; ChatML with that system
        # message spelled out gives the template's ids.
        system = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT.format(date="2024-09-30")}
        assert ours.encode_chat(messages, add_generation_prompt) != [1, *expected]
        assert ours.encode_chat([system, *messages], add_generation_prompt) == [1, *expected]


def test_template_variables_reach_the_template(checkpoint, hf):
    name, directory = checkpoint
    ours = load_tokenizer(directory)
    messages = CONVERSATIONS["one-user-turn"]
    ids = ours.apply_chat_template(messages, True, date_string="2031-01-02")
    assert ids == [1, *hf_chat_ids(hf, messages, True, date_string="2031-01-02")]
    assert (ids != ours.apply_chat_template(messages, True)) == (name == "instruct")


def test_template_helpers_match_transformers(checkpoint, hf):
    _, directory = checkpoint
    ours = load_tokenizer(directory)
    # strftime_now, tojson with non-ASCII text, bos_token, loop controls, as transformers provides them.
    ours.chat_template = hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% continue %}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] | tojson }} {{ strftime_now('%Y') }}<|im_end|>\n{% endfor %}"
    )
    messages = CONVERSATIONS["multi-turn-es"]
    expected = hf_chat_ids(hf, messages, False)
    assert expected[0] == 1  # the template wrote BOS, so it is not doubled
    assert ours.apply_chat_template(messages) == expected
    ours.chat_template = hf.chat_template = "{{ raise_exception('no chat here') }}"
    with pytest.raises(jinja2.TemplateError, match="no chat here"):
        hf.apply_chat_template(messages)
    with pytest.raises(jinja2.TemplateError, match="no chat here"):
        ours.apply_chat_template(messages)


def test_a_base_model_without_template_uses_chatml(tmp_path):
    directory = write_salamandra_checkpoint(tmp_path, template=None)
    ours = load_tokenizer(directory)
    assert ours.chat_template is None
    messages = CONVERSATIONS["multi-turn-ca-with-system"]
    assert ours.apply_chat_template(messages, True) == ours.encode_chat(messages, True)


@torch.no_grad()
def test_load_decoder_reads_the_shards(checkpoint):
    _, directory = checkpoint
    decoder = load_decoder(directory, attention="sdpa")
    assert decoder.lm_head.weight.dtype == torch.bfloat16  # the checkpoint's dtype
    config = decoder.config
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.d_ff) == (2, 64, 4, 2, 96)
    assert (config.rope_theta, config.norm_eps, config.tie_embeddings) == (10_000.0, 1e-5, False)
    ours = load_decoder(directory, dtype=torch.float32, attention="sdpa").eval()
    reference = transformers.LlamaForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([load_tokenizer(directory).encode_chat(CONVERSATIONS["multi-turn-es"])])
    assert_close_scaled(ours(ids), reference(input_ids=ids).logits, rel=1e-5)
