"""Which language an answer is written in, and language fidelity: the share of answers written in the
language that was asked for (Salamandra's vision report, arXiv 2503.22577, measures it to show
answers drifting into English once an image is in the prompt).

Identification is py3langid's (langid.py's model, shipped inside its wheel: nothing is
downloaded), restricted to Salamandra's 35 languages. It knows 34 of them: Serbo-Croatian (sh) is
identified as one of its standard forms (hr, sr, bs are one group below). `language_fidelity`
reports strict agreement and agreement up to a close relative, since short answers in such pairs
are often told apart by one word or none.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import cache
from typing import Any

# Salamandra's 35 European languages (its model card), ISO 639-1 codes.
SALAMANDRA_LANGUAGES = ("bg", "ca", "cs", "cy", "da", "de", "el", "en", "es", "et", "eu", "fi", "fr", "ga", "gl", "hr",
                        "hu", "it", "lt", "lv", "mt", "nl", "nn", "no", "oc", "pl", "pt", "ro", "ru", "sh", "sk", "sl",
                        "sr", "sv", "uk")
# Languages close enough that a short answer may be either: an answer in the group's other
# language counts for the grouped figure.
RELATIVES = (frozenset({"hr", "sr", "bs", "sh"}), frozenset({"no", "nn", "da"}), frozenset({"cs", "sk"}),
             frozenset({"gl", "pt"}), frozenset({"ca", "oc"}))
# Codes the identifier can return for Salamandra's languages (sh has no model of its own; bs is
# added so that Bosnian-looking Serbo-Croatian is not forced into an unrelated language).
IDENTIFIABLE = tuple(sorted({*SALAMANDRA_LANGUAGES, "bs"} - {"sh"}))


@cache
def _identifier(languages: tuple[str, ...]):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)  # its own instance: restricted below
    identifier.set_languages(list(languages))
    return identifier


def identify_language(text: str, candidates: Sequence[str] | None = None) -> str | None:
    """The most likely language of `text` (ISO 639-1) among `candidates` (default: Salamandra's
    languages), or None for text without a letter (nothing to identify). An evaluation in a few
    languages should name them: the question is then which of those the answer is in, and a short
    Spanish caption is not taken for Galician."""
    if not any(ch.isalpha() for ch in text):
        return None
    languages = IDENTIFIABLE if candidates is None else tuple(sorted({"hr" if c == "sh" else c for c in candidates}))
    unknown = sorted(set(languages) - set(IDENTIFIABLE))
    if unknown:
        raise ValueError(f"cannot identify {unknown}: the identifier knows {', '.join(IDENTIFIABLE)}")
    language, _ = _identifier(languages).classify(text)
    return language


def same_language(found: str | None, asked: str, grouped: bool) -> bool:
    if found is None:
        return False
    if found == asked:
        return True
    return grouped and any(found in group and asked in group for group in RELATIVES)


def language_fidelity(predictions: Sequence[str], languages: Sequence[str],
                      candidates: Sequence[str] | None = None) -> dict[str, Any]:
    """{"strict", "grouped": shares over all answers (0..1), "per_language": {language: {"strict",
    "grouped", "count", "found": the languages its answers were identified as, by count}}}.
    `candidates`: the languages an answer may be identified as (identify_language)."""
    if len(predictions) != len(languages):
        raise ValueError(f"{len(predictions)} predictions but {len(languages)} languages")
    unknown = sorted(set(languages) - set(SALAMANDRA_LANGUAGES) - {"bs"})
    if unknown:
        raise ValueError(f"languages {unknown} are not among Salamandra's: {', '.join(SALAMANDRA_LANGUAGES)}")
    found = [identify_language(p, candidates) for p in predictions]
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"strict": 0, "grouped": 0, "count": 0, "found": Counter()})
    for language, identified in zip(languages, found):
        entry = per[language]
        entry["count"] += 1
        entry["strict"] += same_language(identified, language, grouped=False)
        entry["grouped"] += same_language(identified, language, grouped=True)
        entry["found"][identified or "none"] += 1
    total = max(len(predictions), 1)
    return {
        "strict": sum(e["strict"] for e in per.values()) / total,
        "grouped": sum(e["grouped"] for e in per.values()) / total,
        "per_language": {language: {"strict": e["strict"] / e["count"], "grouped": e["grouped"] / e["count"],
                                    "count": e["count"], "found": dict(e["found"].most_common())}
                         for language, e in sorted(per.items())},
    }
