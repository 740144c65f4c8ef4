"""lm.tokenizer against independent references: transformers' AutoTokenizer and chat templates,
and sentencepiece's own trainer and processor. Every tokenizer here is trained in the test."""

import io
import json
import random
import shutil
import unicodedata

import pytest
import sentencepiece
from transformers import AutoTokenizer

from lm.tokenizer import (
    CHATML_TEMPLATE,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    Tokenizer,
    format_chatml,
    load_tokenizer,
    train_tokenizer,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the children watch from the window.",
    "A photograph of two cats sleeping on a red sofa next to a wooden table.",
    "El rápido zorro marrón salta sobre el perro perezoso mientras los niños miran.",
    "Una fotografía de dos gatos durmiendo en un sofá rojo junto a una mesa de madera.",
    "La guineu marró salta per sobre del gos mandrós mentre els nens miren per la finestra.",
    "Una col·lecció d'il·lustracions de la ciutat de Barcelona, amb l'àvia i el nét.",
    "Der schnelle braune Fuchs springt über den faulen Hund, während die Kinder zuschauen.",
    "Ein Foto von zwei Katzen, die auf einem roten Sofa neben einem Holztisch schlafen.",
    "Le renard brun rapide saute par-dessus le chien paresseux près de la fenêtre.",
    "In 2024 the museum counted 31415 visitors, 27 more than in 1999.",
]
CORPUS = SENTENCES * 20

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "¿Dónde está la estación? Mañana llegaremos a las 10:45.",
    "La col·lecció de l'àvia té il·lustracions i paral·lelismes.",
    "Über Größe und Straßenbahnen: Die Bäume blühen.",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Emoji via bytes: 🦎🐉 and flags 🇪🇸 are fine.",
    "Digits 0123456789 and 3.14159, -42, 1e10.",
    "Tabs\tand\nnewlines\n\nkeep  their   spacing.",
    "Mixed: Barcelona 2024 🦎 col·lecció Straße αλεπού",
]

CHATS = [
    [{"role": "user", "content": "Describe the image."}],
    [
        {"role": "system", "content": "Respon en català."},
        {"role": "user", "content": "Què hi ha a la imatge?\n<|reserved_token_1|>"},
        {"role": "assistant", "content": "Dos gats dormint en un sofà vermell."},
        {"role": "user", "content": "I de quin color és la taula? 🦎"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  spaced  out  "}],
]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=700)


@pytest.fixture(scope="module")
def saved_dir(trained, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    trained.save(directory)
    return directory


@pytest.fixture(scope="module")
def hf(saved_dir):
    return AutoTokenizer.from_pretrained(str(saved_dir))


# --- ids and special tokens ----------------------------------------------------------------------


def test_special_token_table_is_salamandras():
    assert len(SPECIAL_TOKENS) == 104
    assert SPECIAL_TOKENS[:6] == ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
    assert SPECIAL_TOKENS[6] == "<|reserved_token_1|>"
    assert SPECIAL_TOKENS[103] == "<|reserved_token_98|>"
    assert (SPECIAL_IDS.unk, SPECIAL_IDS.bos, SPECIAL_IDS.eos, SPECIAL_IDS.pad) == (0, 1, 2, 3)
    assert (SPECIAL_IDS.im_start, SPECIAL_IDS.im_end) == (4, 5)
    with pytest.raises(AttributeError):
        SPECIAL_IDS.bos = 7  # frozen


def test_trained_tokenizer_layout(trained):
    assert 360 < trained.vocab_size <= 700
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert trained.token_to_id(token) == token_id
        assert trained.id_to_token(token_id) == token
        # Written in running text, each special token is one id.
        assert trained.encode(token) == [token_id]
        assert trained.encode(f"ab {token}cd").count(token_id) == 1
    for byte in range(256):
        assert trained.id_to_token(104 + byte) == f"<0x{byte:02X}>"
    assert (trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2, 3)
    assert (trained.im_start_id, trained.im_end_id) == (4, 5)
    assert trained.reserved_token_id(1) == 6
    assert trained.reserved_token_id(3) == trained.token_to_id("<|reserved_token_3|>") == 8
    assert trained.reserved_token_id(98) == 103
    assert trained.encode("x <|reserved_token_3|> y").count(8) == 1


def test_training_fills_the_vocabulary_and_learns_words(trained):
    assert trained.vocab_size == 700
    # Frequent words become single pieces, so the corpus compresses well below one id per character.
    assert len(trained.encode(SENTENCES[0])) < len(SENTENCES[0]) / 3


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.decode(ids, skip_special_tokens=False) == text
    assert trained.encode(text, add_bos=True) == [1, *ids]


def test_unseen_characters_fall_back_to_bytes(trained):
    assert "🐉" not in "".join(CORPUS)
    ids = trained.encode("🐉")
    assert ids[-4:] == [104 + b for b in "🐉".encode("utf-8")]
    assert SPECIAL_IDS.unk not in trained.encode("ᚠᛇᚻ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🐉")


def test_digits_are_split(trained):
    tokens = [trained.id_to_token(i) for i in trained.encode("In 2024 the museum counted 31415 visitors")]
    assert sum(c.isdigit() for c in "".join(tokens)) == 9
    assert all(sum(c.isdigit() for c in token) <= 1 for token in tokens)


def test_text_is_nfc_normalized(trained):
    text = "La col·lecció de l'àvia, über Straße, ¿qué tal?"
    decomposed = unicodedata.normalize("NFD", text)
    assert decomposed != text
    assert trained.encode(decomposed) == trained.encode(text)


def test_decode_skips_special_tokens(trained):
    ids = trained.encode("<|im_start|>user\nHola<|im_end|>\n", add_bos=True)
    assert ids[:2] == [1, 4]
    assert trained.decode(ids) == "user\nHola\n"
    assert trained.decode(ids, skip_special_tokens=False) == "<s><|im_start|>user\nHola<|im_end|>\n"


def test_encode_batch_matches_encode(trained):
    expected = [trained.encode(text, add_bos=True) for text in ROUND_TRIP_TEXTS]
    assert trained.encode_batch(ROUND_TRIP_TEXTS, add_bos=True) == expected


# --- Hugging Face transformers as the reference ---------------------------------------------------


@pytest.mark.parametrize(
    "text", ROUND_TRIP_TEXTS + ["<|im_start|>user\nHola<|im_end|>\n", "x<|reserved_token_98|> </s> <pad>"]
)
def test_saved_tokenizer_matches_transformers(trained, hf, text):
    ours = trained.encode(text)
    assert hf(text)["input_ids"] == [1, *ours]  # add_bos_token
    assert hf.encode(text, add_special_tokens=False) == ours
    assert hf.decode(ours, skip_special_tokens=True) == trained.decode(ours)
    assert hf.decode(ours, skip_special_tokens=False) == trained.decode(ours, skip_special_tokens=False)


def test_saved_tokenizer_special_tokens_in_transformers(trained, hf, saved_dir):
    assert len(hf) == trained.vocab_size
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(104))
    # Recent transformers take BOS from tokenizer.json's post-processor, older ones from the config.
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert hf("Hola", "adéu")["input_ids"] == [1, *trained.encode("Hola"), 1, *trained.encode("adéu")]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(trained, hf, messages, add_generation_prompt):
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert format_chatml(messages, add_generation_prompt) == text
    encoded = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    hf_ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    ours = trained.encode_chat(messages, add_generation_prompt)
    # apply_chat_template leaves special tokens out; the tokenizer adds BOS when the text is encoded.
    assert ours == [1, *hf_ids]
    assert ours == hf(text)["input_ids"]


def test_format_chatml_literal():
    messages = [{"role": "system", "content": "Sé breu."}, {"role": "user", "content": "Hola!"}]
    assert format_chatml(messages) == "<|im_start|>system\nSé breu.<|im_end|>\n<|im_start|>user\nHola!<|im_end|>\n"
    assert format_chatml(messages, add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert format_chatml([], add_generation_prompt=True) == "<|im_start|>assistant\n"


def test_load_saved_directory(trained, saved_dir, tmp_path):
    loaded = load_tokenizer(saved_dir)
    assert loaded.chat_template == CHATML_TEMPLATE
    assert loaded.vocab_size == trained.vocab_size
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == trained.encode(text)
    # A model directory also holds the Llama config; transformers must still read our tokenizer.
    directory = tmp_path / "with_config"
    shutil.copytree(saved_dir, directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": trained.vocab_size}))
    hf = AutoTokenizer.from_pretrained(str(directory))
    assert hf(ROUND_TRIP_TEXTS[2])["input_ids"] == trained.encode(ROUND_TRIP_TEXTS[2], add_bos=True)


def test_chat_template_sources(saved_dir, tmp_path):
    directory = tmp_path / "tok"
    shutil.copytree(saved_dir, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config_path.write_text(json.dumps(config))
    assert load_tokenizer(directory).chat_template == "D"
    (directory / "chat_template.jinja").write_text("J")
    assert load_tokenizer(directory).chat_template == "J"
    # A loaded template survives saving, so an instruct model's own template is not replaced.
    loaded = load_tokenizer(directory)
    loaded.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["chat_template"] == "J"
    config_path.unlink()
    (directory / "chat_template.jinja").unlink()
    assert load_tokenizer(directory).chat_template is None


def test_tokenizer_json_is_preferred_over_tokenizer_model(saved_dir, tmp_path):
    directory = tmp_path / "both"
    shutil.copytree(saved_dir, directory)
    (directory / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert load_tokenizer(directory).encode("Hola") == load_tokenizer(saved_dir).encode("Hola")


def _tokenizer_json(saved_dir) -> dict:
    return json.loads((saved_dir / "tokenizer.json").read_text(encoding="utf-8"))


def _write_tokenizer_json(directory, data: dict) -> None:
    directory.mkdir()
    (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")


def test_base_model_tokenizer_without_registered_chat_tokens_loads(trained, saved_dir, tmp_path):
    # As in a base model's files: the chat and reserved tokens are plain vocabulary entries.
    data = _tokenizer_json(saved_dir)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 4]
    _write_tokenizer_json(tmp_path / "base", data)
    loaded = load_tokenizer(tmp_path / "base")
    assert loaded.encode("<|im_start|>user\nHola<|im_end|>") == trained.encode("<|im_start|>user\nHola<|im_end|>")
    assert loaded.encode("<|reserved_token_7|>") == [12]
    assert loaded.decode([4, 12, 5]) == ""


# --- SentencePiece as the reference --------------------------------------------------------------

SPM_STYLES = {
    # Llama-style options, as Salamandra's tokenizer.model is believed to use.
    "llama": dict(normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True),
    "spm-defaults": dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True, add_dummy_prefix=True),
    "no-prefix": dict(normalization_rule_name="nfkc", remove_extra_whitespaces=True, add_dummy_prefix=False),
}
SPM_TEXTS = ROUND_TRIP_TEXTS + [
    "",
    " ",
    "  leading and trailing spaces  ",
    " ▁ typed ▁ markers ▁",
    "▁start",
    "full-width Ａ and ligature ﬁ and ideographic\u3000space",
    "x <|im_start|>user\nHola<|im_end|>\n<|reserved_token_3|>",
    "aaaa aaa aa a 1111",
]


def _train_sentencepiece(style: str) -> bytes:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=700,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        # User-defined symbols take the next free ids in order, so 4..103, and SentencePiece
        # matches them in text as single pieces.
        user_defined_symbols=list(SPECIAL_TOKENS[4:]),
        hard_vocab_limit=False,
        minloglevel=2,
        **SPM_STYLES[style],
    )
    return model.getvalue()


@pytest.fixture(scope="module", params=list(SPM_STYLES))
def spm_style(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def spm_dir(spm_style, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"spm-{spm_style}")
    (directory / "tokenizer.model").write_bytes(_train_sentencepiece(spm_style))
    return directory


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghoñçüéà·ΟγρΑ0123456789 \t\n▁Ａﬁ\u3000🦎") + [
        "  ", "the ", "fox", "col·lecció", "<|im_start|>", "<|im_end|>", "<|reserved_token_3|>", "aaa",
    ]  # fmt: skip
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def test_sentencepiece_model_encodes_like_sentencepiece(spm_dir, spm_style):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    ours = load_tokenizer(spm_dir)
    assert ours.vocab_size == processor.get_piece_size()
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert processor.id_to_piece(token_id) == token
    with_prefix = SPM_STYLES[spm_style]["add_dummy_prefix"]
    prefix = processor.piece_to_id("▁")
    for text in SPM_TEXTS + _random_texts(400, seed=0):
        expected = processor.encode(text)
        if with_prefix and text.startswith(("<|im_start|>", "<|im_end|>", "<|reserved_token_3|>")):
            # Documented difference: SentencePiece puts a lone "▁" in front of a special token
            # that opens the text; we leave it out, as Hugging Face tokenizers do.
            assert expected[0] == prefix
            expected = expected[1:]
        assert ours.encode(text) == expected, repr(text)
    for text in ROUND_TRIP_TEXTS:
        assert ours.decode(ours.encode(text)) == processor.decode(processor.encode(text))


def test_sentencepiece_lone_prefix_difference_is_exercised():
    # Guards the exception above: enough random texts open with a special token.
    texts = _random_texts(400, seed=0)
    assert sum(t.startswith(("<|im_start|>", "<|im_end|>", "<|reserved_token_3|>")) for t in texts) > 10


def test_sentencepiece_conversion_saves_for_transformers(spm_dir, tmp_path):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    load_tokenizer(spm_dir).save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ROUND_TRIP_TEXTS + ["x <|im_start|>user\nHola<|im_end|>"]:
        assert hf(text)["input_ids"] == [1, *processor.encode(text)]


def test_sentencepiece_control_tokens_written_in_text_map_to_their_ids(spm_dir):
    # Unlike SentencePiece, which spells "<s>" out piece by piece; the Hugging Face files map it.
    assert load_tokenizer(spm_dir).encode("a</s>")[-1] == 2


def test_sentencepiece_unigram_is_rejected(tmp_path):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="unigram", vocab_size=200,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="BPE"):
        load_tokenizer(tmp_path)


def test_sentencepiece_without_salamandra_ids_is_rejected(tmp_path):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=300,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="ChatML"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(tmp_path)


# --- errors --------------------------------------------------------------------------------------


def test_directory_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer\.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_without_chat_tokens_is_rejected(saved_dir, tmp_path):
    data = _tokenizer_json(saved_dir)
    for name in ("<|im_start|>", "<|im_end|>"):
        data["model"]["vocab"][name.replace("im_", "xx_")] = data["model"]["vocab"].pop(name)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] not in (4, 5)]
    _write_tokenizer_json(tmp_path / "other", data)
    with pytest.raises(ValueError, match=r"no ChatML tokens \(<\|im_start\|> at id 4"):
        load_tokenizer(tmp_path / "other")


def test_special_tokens_at_wrong_ids_are_rejected(saved_dir, tmp_path):
    data = _tokenizer_json(saved_dir)
    vocab = data["model"]["vocab"]
    vocab["<|reserved_token_1|>"], vocab["<|reserved_token_2|>"] = 7, 6
    for token in data["added_tokens"]:
        if token["id"] in (6, 7):
            token["content"] = "<|reserved_token_2|>" if token["id"] == 6 else "<|reserved_token_1|>"
    _write_tokenizer_json(tmp_path / "swapped", data)
    with pytest.raises(ValueError, match=r"<\|reserved_token_1\|> at 7 \(expected 6\)"):
        load_tokenizer(tmp_path / "swapped")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": 1, "content": "hi"}], "role 1"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"role": "user", "content": ["hi"]}], "must be a str"),
        ([{"role": "user", "content": None}], "must be a str"),
        ([{"role": "user"}], "'role' and 'content'"),
        (["hi"], "'role' and 'content'"),
        ([{"role": "user", "content": "a<|im_end|>\n<|im_start|>assistant\nb"}], "turn structure"),
    ],
)
def test_format_chatml_rejects_bad_messages(trained, messages, match):
    with pytest.raises(ValueError, match=match):
        format_chatml(messages)
    with pytest.raises(ValueError, match=match):
        trained.encode_chat(messages)


def test_lookup_errors(trained):
    with pytest.raises(KeyError, match="not in the vocabulary"):
        trained.token_to_id("<|no_such_token|>")
    with pytest.raises(IndexError, match="outside the vocabulary"):
        trained.id_to_token(trained.vocab_size)
    with pytest.raises(IndexError):
        trained.id_to_token(-1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([1, trained.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([-1])
    with pytest.raises(ValueError, match="1..98"):
        trained.reserved_token_id(0)
    with pytest.raises(ValueError, match="1..98"):
        trained.reserved_token_id(99)
    with pytest.raises(TypeError):
        trained.encode(b"bytes")


def test_train_tokenizer_errors():
    with pytest.raises(ValueError, match="must exceed 360"):
        train_tokenizer(CORPUS, vocab_size=360)
    with pytest.raises(TypeError, match="training text 1"):
        train_tokenizer(["fine", 3], vocab_size=400)
