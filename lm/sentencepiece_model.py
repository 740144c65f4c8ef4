"""SentencePiece `tokenizer.model` files as ``tokenizers.Tokenizer`` objects.

The model is read with SentencePiece's own protobuf schema (the sentencepiece and protobuf packages
are needed only here) and converted to a ``tokenizers`` BPE that encodes as SentencePiece does.
"""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from lm.special_tokens import SPECIAL_TOKENS

__all__ = ["convert_sentencepiece"]

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
_BPE_MODEL = 2


@dataclass
class _SentencePieceModel:
    pieces: list[tuple[str, float, int]]
    model_type: int
    byte_fallback: bool
    unk_id: int
    treat_whitespace_as_suffix: bool
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


def _parse_sentencepiece(data: bytes) -> _SentencePieceModel:
    """The fields the conversion needs, read with SentencePiece's own protobuf schema."""
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise ImportError(
            "reading a SentencePiece tokenizer.model needs the sentencepiece and protobuf packages "
            f"({error}); install them, or use a directory with tokenizer.json"
        ) from error
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as error:
        raise ValueError(f"not a SentencePiece model: {error}") from None
    if not proto.pieces:
        raise ValueError("not a SentencePiece model: no pieces")
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    if not 0 <= trainer.unk_id < len(proto.pieces):
        raise ValueError(f"not a SentencePiece model: unk_id {trainer.unk_id} is outside its {len(proto.pieces)} pieces")
    return _SentencePieceModel(
        pieces=[(p.piece, p.score, p.type) for p in proto.pieces],
        model_type=trainer.model_type,
        byte_fallback=trainer.byte_fallback,
        unk_id=trainer.unk_id,
        treat_whitespace_as_suffix=trainer.treat_whitespace_as_suffix,
        precompiled_charsmap=normalizer.precompiled_charsmap,
        add_dummy_prefix=normalizer.add_dummy_prefix,
        remove_extra_whitespaces=normalizer.remove_extra_whitespaces,
        escape_whitespaces=normalizer.escape_whitespaces,
    )


def convert_sentencepiece(model_bytes: bytes) -> tokenizers.Tokenizer:
    """Build a ``tokenizers.Tokenizer`` that encodes like ``SentencePieceProcessor`` on a BPE model.

    Special and user-defined pieces become added tokens matched in normalized text, as
    SentencePiece matches them. Two differences, both as Hugging Face tokenizers behave: control
    pieces (``<s>``, ``</s>``, ``<pad>``) written in the text map to their ids, where SentencePiece
    spells them out; and a text that opens with a special piece gets no lone ``"▁"`` before it.
    Only BPE models are accepted (Salamandra's kind).
    """
    spm = _parse_sentencepiece(model_bytes)
    if spm.model_type != _BPE_MODEL:
        raise ValueError(
            f"only SentencePiece BPE models are supported (Salamandra's kind), got model_type {spm.model_type}"
        )
    if spm.treat_whitespace_as_suffix or not spm.escape_whitespaces:
        raise ValueError(
            "SentencePiece models with treat_whitespace_as_suffix or without escape_whitespaces are not supported"
        )

    vocab = {piece: token_id for token_id, (piece, _, _) in enumerate(spm.pieces)}
    # SentencePiece BPE merges the adjacent pair whose joined piece scores highest; a merge list
    # ranked by that score makes the tokenizers BPE take the same steps.
    normal = {piece: (score, token_id) for token_id, (piece, score, kind) in enumerate(spm.pieces) if kind == _NORMAL}
    ranked = []
    for piece, (score, token_id) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, token_id, cut, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]

    backend = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=spm.pieces[spm.unk_id][0],
            byte_fallback=spm.byte_fallback,
            fuse_unk=True,
        )
    )

    # The dummy prefix is left to a Metaspace pre-tokenizer: added tokens are matched in normalized
    # text after their own text is normalized too, so a normalizer that prefixed the text would
    # turn "<|im_start|>" into "▁<|im_start|>". Metaspace adds no prefix to text that already starts
    # with "▁", which the rules marked (*) take into account. split=False: SentencePiece runs BPE over
    # the whole text (its pieces never span a word boundary anyway).
    # Anchors are \A and \z because tokenizers' regex engine reads ^ and $ as line anchors.
    steps = []
    if spm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spm.precompiled_charsmap))
    if spm.remove_extra_whitespaces:
        # SentencePiece drops leading spaces and collapses runs of them before escaping, so only
        # " " counts there (not tabs, newlines or a typed "▁"), and trims trailing ones after
        # escaping, so a typed "▁" goes too. (*) With a dummy prefix, the one leading space left
        # by collapsing stands for the prefix, and a typed leading "▁" is doubled to get one.
        if spm.add_dummy_prefix:
            steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))  # (*)
        else:
            steps.append(normalizers.Replace(Regex(r"\A +"), ""))
        steps += [
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Replace(" ", "▁"),
            normalizers.Replace(Regex(r"▁+\z"), ""),
        ]
    else:
        steps.append(normalizers.Replace(" ", "▁"))
        if spm.add_dummy_prefix:
            steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))  # (*)
    backend.normalizer = normalizers.Sequence(steps)
    if spm.add_dummy_prefix:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)

    chain = [decoders.Replace("▁", " ")]
    if spm.byte_fallback:
        chain.append(decoders.ByteFallback())
    chain.append(decoders.Fuse())
    if spm.add_dummy_prefix:
        chain.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(chain)

    salamandra = set(SPECIAL_TOKENS)
    backend.add_special_tokens(
        [
            AddedToken(piece, special=True, normalized=True)
            for piece, _, kind in spm.pieces
            if kind in (_UNKNOWN, _CONTROL) or (kind == _USER_DEFINED and piece in salamandra)
        ]
    )
    backend.add_tokens(
        [
            AddedToken(piece, special=False, normalized=True)
            for piece, _, kind in spm.pieces
            if kind == _USER_DEFINED and piece not in salamandra
        ]
    )
    return backend
