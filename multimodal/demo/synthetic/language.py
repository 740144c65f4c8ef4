"""Language identification for the language-fidelity metric: `detect_language(text)` tells en / es /
ca apart by the words only one language's captions use."""

from __future__ import annotations

import functools
import re

from multimodal.demo.synthetic.captions import LANGUAGES, all_contents, caption_of_content

# A few frequent words beyond the captions, so short free text around the demo's prompts and
# answers is judged too (a model that drifts into "the image shows" is still caught as English).
_EXTRA_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("the", "is", "of", "with", "and", "this", "image", "shows", "there", "picture", "in"),
    "es": ("el", "los", "las", "y", "con", "es", "esta", "imagen", "muestra", "hay", "en"),
    "ca": ("el", "els", "les", "i", "amb", "és", "aquesta", "imatge", "mostra", "hi", "ha", "en"),
}
_WORD = re.compile(r"[^\W\d_]+'?")


def _words(text: str) -> list[str]:
    # Catalan elisions stay marked ("l'", "d'"): they are among its clearest signs.
    return _WORD.findall(text.lower().replace("’", "'"))


@functools.lru_cache(maxsize=1)
def _exclusive_lexicons() -> dict[str, frozenset[str]]:
    vocab = {language: set(_EXTRA_WORDS[language]) for language in LANGUAGES}
    for content in all_contents():
        for language in LANGUAGES:
            vocab[language].update(_words(caption_of_content(content, language)))
    # Only words that belong to exactly one language vote ("estrella", "una", "triangle" do not).
    return {language: frozenset(words - set().union(*(vocab[o] for o in LANGUAGES if o != language)))
            for language, words in vocab.items()}


def detect_language(text: str) -> str | None:
    """The language of `text` ("en", "es" or "ca"), by counting words found only in that language's
    lexicon (captions plus a few function words); None on a tie, including no such word at all."""
    lexicons = _exclusive_lexicons()
    counts = {language: 0 for language in LANGUAGES}
    for word in _words(text):
        for language, lexicon in lexicons.items():
            if word in lexicon:
                counts[language] += 1
    best = max(counts.values())
    winners = [language for language, count in counts.items() if count == best]
    return winners[0] if best > 0 and len(winners) == 1 else None
