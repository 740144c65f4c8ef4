"""A tiny Salamandra checkpoint directory in the layout of the real Hugging Face repositories.

`write_salamandra_checkpoint(directory)` writes what `hf download BSC-LT/salamandra-2b-instruct`
puts on disk, at toy sizes and with random weights:

- `config.json`: a LlamaConfig with Salamandra's fields (untied head, no biases, rope theta
  10,000, bf16), tiny shapes;
- `model-0000N-of-0000M.safetensors` shards listed by `model.safetensors.index.json`, bf16, with
  the weight names and initialisation of `transformers.LlamaForCausalLM` itself;
- `tokenizer.model`: a SentencePiece BPE trained here with Salamandra's settings (byte fallback,
  split digits, `<unk> <s> </s> <pad>` at 0..3, `<|im_start|> <|im_end|>` and the 98
  `<|reserved_token_N|>` at 4..103);
- `tokenizer.json`: that model in the layout Hugging Face's Llama conversion wrote for Salamandra
  (a "legacy" Llama tokenizer: `Prepend("▁")` + `Replace(" ", "▁")` normalizer, no pre-tokenizer,
  byte-fallback BPE, BOS-adding post-processor), the 104 special tokens as added tokens;
- `tokenizer_config.json` (class `LlamaTokenizer`, `add_bos_token`, `legacy`, the added tokens and a
  chat template), `special_tokens_map.json` and `generation_config.json`.

The vocabulary is built by transformers' SentencePiece converter and the weights by transformers'
Llama, so the code under test reads files it did not write.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2
from transformers.convert_slow_tokenizer import SpmConverter

from lm.tokenizer import SPECIAL_TOKENS

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the children watch from the window.",
    "A photograph of two cats sleeping on a red sofa next to a wooden table.",
    "El rápido zorro marrón salta sobre el perro perezoso mientras los niños miran.",
    "Una fotografía de dos gatos durmiendo en un sofá rojo junto a una mesa de madera.",
    "¿Qué hay en la imagen? Describe la escena con detalle, por favor.",
    "La guineu marró salta per sobre del gos mandrós mentre els nens miren per la finestra.",
    "Una col·lecció d'il·lustracions de la ciutat de Barcelona, amb l'àvia i el nét.",
    "Què hi ha a la imatge? Descriu l'escena amb detall, si us plau.",
    "You are a helpful assistant. Answer in the language of the question.",
    "In 2024 the museum counted 31415 visitors, 27 more than in 1999.",
] * 20

# Plain ChatML, written the way Hugging Face repositories usually spell it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Shaped like Salamandra instruct's template (its tokenizer_config.json on the Hub): ChatML turns, and
# without a system message a default trilingual one carrying a date (`date_string`, which the caller
# may pass, with a fixed default). The wording is this test's own.
DEFAULT_SYSTEM_PROMPT = (
    "I am a test assistant. Today's date: {date}.\n"
    "Soy un asistente de prueba. Fecha de hoy: {date}.\n"
    "Sóc un assistent de prova. Data d'avui: {date}."
)
INSTRUCT_TEMPLATE = (
    "{%- if date_string is not defined %}{%- set date_string = '2024-09-30' %}{%- endif %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '" + DEFAULT_SYSTEM_PROMPT.replace("'", "\\'").replace("\n", "\\n").replace(
        "{date}", "' + date_string + '") + "' %}"
    "{%- set turns = messages %}"
    "{%- endif %}"
    "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
    "{%- for message in turns %}"
    "{%- if message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception('only user and assistant turns may follow the system message') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TEMPLATES = {"chatml": CHATML_TEMPLATE, "instruct": INSTRUCT_TEMPLATE}


def train_sentencepiece(vocab_size: int = 700) -> bytes:
    """A SentencePiece BPE with Salamandra's special pieces at Salamandra's ids."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
        user_defined_symbols=list(SPECIAL_TOKENS[4:]), hard_vocab_limit=False, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    )  # fmt: skip
    return model.getvalue()


def legacy_llama_tokenizer_json(spm_bytes: bytes) -> dict:
    """The tokenizer.json of Hugging Face's legacy Llama conversion of a SentencePiece BPE model."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_bytes)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    built = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    data = json.loads(built.to_str())
    data["model"].update(ignore_merges=False, fuse_unk=True, byte_fallback=True, unk_token="<unk>")
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]}  # fmt: skip
    data["pre_tokenizer"] = None
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}  # fmt: skip
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }  # fmt: skip
    data["added_tokens"] = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, token in enumerate(SPECIAL_TOKENS)
    ]  # fmt: skip
    return data


def _added_tokens_decoder() -> dict:
    return {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, token in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip


def write_salamandra_checkpoint(
    directory: str | Path,
    *,
    template: str | None = "chatml",
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_ff: int = 96,
    num_shards: int = 3,
    seed: int = 0,
) -> Path:
    """Write a tiny Salamandra-layout checkpoint into `directory` and return it.

    `template`: "chatml" (plain ChatML), "instruct" (Salamandra-instruct-like, default system
    prompt with a date), another Jinja string, or None (a base model: no chat template).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    spm_bytes = train_sentencepiece()
    (directory / "tokenizer.model").write_bytes(spm_bytes)
    tokenizer_json = legacy_llama_tokenizer_json(spm_bytes)
    backend = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json))
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=2), encoding="utf-8")

    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 8192,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if template is not None:
        tokenizer_config["chat_template"] = TEMPLATES.get(template, template)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2))
    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                          "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": d_model // n_heads,
        "hidden_act": "silu",
        "hidden_size": d_model,
        "initializer_range": 0.02,
        "intermediate_size": d_ff,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")

    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    state = {name: tensor.detach().to(torch.bfloat16).contiguous()
             for name, tensor in transformers.LlamaForCausalLM(hf_config).state_dict().items()}
    names = list(state)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for index in range(num_shards):
        shard_names = names[index * per_shard:(index + 1) * per_shard]
        file_name = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({name: state[name] for name in shard_names}, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, file_name))
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory
