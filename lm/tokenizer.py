"""The Salamandra tokenizer: load, train, save, and the ChatML prompt format.

Salamandra's tokenizer is a SentencePiece BPE with 256,000 pieces, byte fallback, digits split one
by one and NFC text. Its first 104 ids are fixed special tokens (``SPECIAL_TOKENS``); every
tokenizer this module hands out is checked to have them at those ids, because checkpoints,
the chat format and the VLM's image placeholder (a reserved token) all rely on the numbers.

Everything runs on a ``tokenizers.Tokenizer``: the Hugging Face ``tokenizer.json`` is used as is,
a SentencePiece ``tokenizer.model`` is read with SentencePiece's own protobuf schema and converted,
and ``train_tokenizer`` builds a small tokenizer of the same shape for tests and the offline demo,
so one code path serves the real 256k tokenizer and the toy one.

The special tokens, the ChatML format and chat templates, and the SentencePiece conversion have
files of their own (lm/special_tokens.py, lm/chat_template.py, lm/sentencepiece_model.py); their
public names are exported here too, so `lm.tokenizer` stays the one import for all of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from lm.chat_template import CHAT_ROLES, CHATML_TEMPLATE, format_chatml, read_chat_template, render_chat_template
from lm.sentencepiece_model import convert_sentencepiece
from lm.special_tokens import BYTE_TOKENS, NUM_RESERVED_TOKENS, SPECIAL_IDS, SPECIAL_TOKENS, SpecialTokenIds

__all__ = [
    "BYTE_TOKENS",
    "CHAT_ROLES",
    "CHATML_TEMPLATE",
    "NUM_RESERVED_TOKENS",
    "SPECIAL_IDS",
    "SPECIAL_TOKENS",
    "SpecialTokenIds",
    "Tokenizer",
    "convert_sentencepiece",
    "format_chatml",
    "load_tokenizer",
    "render_chat_template",
    "train_tokenizer",
]

_IM_START, _IM_END = SPECIAL_TOKENS[SPECIAL_IDS.im_start], SPECIAL_TOKENS[SPECIAL_IDS.im_end]


class Tokenizer:
    """A Salamandra-shaped ``tokenizers.Tokenizer`` with the ids and chat format the project uses.

    Construction checks that the 104 special tokens sit at Salamandra's ids and registers any that
    are in the vocabulary but not yet marked special (the backend is modified in place), so that
    their text always encodes to one id and ``decode`` can skip them.
    """

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None) -> None:
        _check_special_tokens(backend)
        _register_special_tokens(backend)
        # Salamandra adds BOS and never EOS. Recent transformers read that from tokenizer.json's
        # post-processor and ignore add_bos_token in the config, so it must be in the file.
        bos = SPECIAL_TOKENS[SPECIAL_IDS.bos]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, SPECIAL_IDS.bos)]
        )
        self.backend = backend
        self.chat_template = chat_template

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        """``<s>``, put in front of every sequence."""
        return SPECIAL_IDS.bos

    @property
    def eos_id(self) -> int:
        return SPECIAL_IDS.eos

    @property
    def pad_id(self) -> int:
        return SPECIAL_IDS.pad

    @property
    def unk_id(self) -> int:
        return SPECIAL_IDS.unk

    @property
    def im_start_id(self) -> int:
        """``<|im_start|>``, opens a ChatML turn."""
        return SPECIAL_IDS.im_start

    @property
    def im_end_id(self) -> int:
        """``<|im_end|>``, closes a turn; chat generation stops here."""
        return SPECIAL_IDS.im_end

    def reserved_token_id(self, n: int) -> int:
        """Id of ``<|reserved_token_n|>``, 1 <= n <= 98."""
        if not 1 <= n <= NUM_RESERVED_TOKENS:
            raise ValueError(f"reserved tokens are numbered 1..{NUM_RESERVED_TOKENS}, got {n}")
        return SPECIAL_IDS.first_reserved + n - 1

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary (size {self.vocab_size})")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(token_id) if token_id >= 0 else None
        if token is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token text such as ``<|im_start|>`` becomes its single id."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [SPECIAL_IDS.bos, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """``encode`` over many texts at once (the backend encodes them in parallel)."""
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {index} is a {type(text).__name__}, not a str")
        prefix = [SPECIAL_IDS.bos] if add_bos else []
        return [prefix + enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # int() accepts tensors and numpy scalars; the range check is ours because the backend
        # silently drops ids it does not know.
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> list[int]:
        """BOS + the ids of ``format_chatml(messages, add_generation_prompt)``.

        Always plain ChatML, whatever ``chat_template`` holds, so training data is formatted the
        same for every checkpoint and never depends on the day (an instruct template's default system
        prompt carries a date). With a system message, or with a plain ChatML template, the ids equal
        ``apply_chat_template``'s; to get an instruct model's default system prompt, use that.
        """
        return self.encode(format_chatml(messages, add_generation_prompt), add_bos=True)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **variables: Any
    ) -> list[int]:
        """BOS + the ids of ``messages`` rendered with this tokenizer's own ``chat_template``.

        For an instruct checkpoint this is the prompt its authors meant: Salamandra instruct's template,
        for one, puts a default system prompt (with a date) in front when the messages have none.
        The ids equal ``transformers.AutoTokenizer.apply_chat_template(messages, tokenize=True, ...)``
        with BOS in front (transformers adds no BOS there; the tokenizer adds it when it encodes the
        rendered text). A template that writes BOS itself does not get a second one. Without a
        template this is ``encode_chat``. ``variables`` are passed to the template (``date_string``).
        """
        template = self.chat_template if self.chat_template is not None else CHATML_TEMPLATE
        text = render_chat_template(template, messages, add_generation_prompt, **variables)
        ids = self.encode(text)
        return ids if ids[:1] == [SPECIAL_IDS.bos] else [SPECIAL_IDS.bos, *ids]

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``transformers.AutoTokenizer``.

        The chat template written is ``chat_template`` when set (a loaded instruct model keeps its
        own), else plain ChatML.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            # The generic class uses tokenizer.json verbatim; LlamaTokenizer would rebuild the
            # normalizer and pre-tokenizer from its own defaults in recent transformers.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": SPECIAL_TOKENS[SPECIAL_IDS.bos],
            "eos_token": SPECIAL_TOKENS[SPECIAL_IDS.eos],
            "unk_token": SPECIAL_TOKENS[SPECIAL_IDS.unk],
            "pad_token": SPECIAL_TOKENS[SPECIAL_IDS.pad],
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template if self.chat_template is not None else CHATML_TEMPLATE,
        }
        with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
            f.write("\n")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a Salamandra tokenizer from a Hugging Face model directory.

    Reads ``tokenizer.json`` when present, else converts a SentencePiece ``tokenizer.model``.
    The chat template comes from ``chat_template.jinja`` or ``tokenizer_config.json`` when either
    exists. All 104 special tokens must be in the vocabulary at Salamandra's ids, or a ValueError
    says which are missing or misplaced; a base-model file where ``<|im_start|>`` and the reserved
    tokens are plain vocabulary entries, not marked special, loads fine and gets them registered.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    json_path, model_path = directory / "tokenizer.json", directory / "tokenizer.model"
    if json_path.is_file():
        backend = tokenizers.Tokenizer.from_file(str(json_path))
    elif model_path.is_file():
        backend = convert_sentencepiece(model_path.read_bytes())
    else:
        raise FileNotFoundError(
            f"no tokenizer in {directory}: looked for tokenizer.json (Hugging Face) and tokenizer.model (SentencePiece)"
        )
    return Tokenizer(backend, chat_template=read_chat_template(directory))


def _check_special_tokens(backend: tokenizers.Tokenizer) -> None:
    misplaced, missing = [], []
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual_id = backend.token_to_id(token)
        if actual_id is None:
            missing.append(token)
        elif actual_id != expected_id:
            misplaced.append(f"{token} at {actual_id} (expected {expected_id})")
    if misplaced:
        raise ValueError(
            "not a Salamandra tokenizer, special tokens are at the wrong ids: "
            + "; ".join(misplaced[:5])
            + (f" and {len(misplaced) - 5} more" if len(misplaced) > 5 else "")
        )
    if _IM_START in missing or _IM_END in missing:
        raise ValueError(
            f"the tokenizer has no ChatML tokens ({_IM_START} at id {SPECIAL_IDS.im_start}, {_IM_END} at id "
            f"{SPECIAL_IDS.im_end}); Salamandra's vocabulary has them at those ids, so this looks like another "
            "model's tokenizer"
        )
    if missing:
        raise ValueError(
            f"the tokenizer lacks {len(missing)} Salamandra special tokens (first: {missing[0]}); every one of "
            f"the {len(SPECIAL_TOKENS)} must be at its id"
        )


def _register_special_tokens(backend: tokenizers.Tokenizer) -> None:
    added = backend.get_added_tokens_decoder()
    unregistered = [
        AddedToken(token, special=True, normalized=False)
        for token_id, token in enumerate(SPECIAL_TOKENS)
        if token_id not in added or not added[token_id].special
    ]
    if unregistered:
        # The tokens are already in the vocabulary, so this reuses their ids.
        backend.add_special_tokens(unregistered)


# --- training ---------------------------------------------------------------------------------


def _salamandra_pipeline(backend: tokenizers.Tokenizer) -> None:
    backend.normalizer = normalizers.NFC()
    # "first": only the start of the text gets the word-boundary marker, not the text that follows
    # a special token, so "<|im_start|>user" encodes "user" the same in every turn.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # A newline is a piece of its own: ChatML puts one between "<|im_start|>assistant" and the
            # answer, and a merge across it would make the training tokens of an answer differ from
            # what generation sees after the prompt "<|im_start|>assistant\n".
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a small Salamandra-shaped BPE tokenizer on ``texts``.

    Same layout as the real one: ids 0..103 the special tokens, 104..359 the byte-fallback pieces
    ``<0x00>``..``<0xFF>``, then learned pieces; metaspace word boundaries, digits split, NFC.
    The vocabulary holds at most ``vocab_size`` entries (fewer when the texts run out of merges).
    """
    reserved = list(SPECIAL_TOKENS) + list(BYTE_TOKENS)
    if vocab_size <= len(reserved):
        raise ValueError(
            f"vocab_size must exceed {len(reserved)} ({len(SPECIAL_TOKENS)} special + {len(BYTE_TOKENS)} byte tokens), "
            f"got {vocab_size}"
        )
    learned_size = vocab_size - len(reserved)

    def checked(items: Iterable[str]) -> Iterator[str]:
        for index, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"training text {index} is a {type(text).__name__}, not a str")
            yield text

    scratch = tokenizers.Tokenizer(BPE())
    _salamandra_pipeline(scratch)
    # limit_alphabet keeps rare characters from crowding out merges; they fall back to bytes.
    trainer = BpeTrainer(vocab_size=learned_size, limit_alphabet=learned_size, show_progress=False)
    scratch.train_from_iterator(checked(texts), trainer=trainer)

    # The trainer numbers its pieces from 0; shift them behind the reserved block. A learned piece
    # spelled like a reserved one keeps the reserved id.
    model = json.loads(scratch.to_str())["model"]
    vocab = {token: token_id for token_id, token in enumerate(reserved)}
    for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    backend = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=SPECIAL_TOKENS[SPECIAL_IDS.unk], byte_fallback=True, fuse_unk=True)
    )
    _salamandra_pipeline(backend)
    return Tokenizer(backend, chat_template=CHATML_TEMPLATE)
