"""Caption prompts: what the user asks when a caption sample becomes a conversation.

Each language's pool asks, in that language, for a description; some phrasings name the language
too. Asking in the language of the answer is what language fidelity is measured against.
"""

from __future__ import annotations

import random

CAPTION_PROMPTS: dict[str, tuple[str, ...]] = {
    "en": (
        "Describe the image.",
        "Describe the image in English.",
        "What does this picture show?",
        "Write a short caption for this image.",
        "Give a brief description of the image in English.",
    ),
    "es": (
        "Describe la imagen.",
        "Describe la imagen en español.",
        "¿Qué muestra esta imagen?",
        "Escribe un pie de foto breve para esta imagen.",
        "Da una breve descripción de la imagen en español.",
    ),
    "ca": (
        "Descriu la imatge.",
        "Descriu la imatge en català.",
        "Què mostra aquesta imatge?",
        "Escriu un peu de foto breu per a aquesta imatge.",
        "Fes una breu descripció de la imatge en català.",
    ),
}


def caption_prompt(language: str, rng: random.Random | None = None) -> str:
    """A prompt from `language`'s pool: drawn with `rng`, or the first (canonical) one without."""
    if language not in CAPTION_PROMPTS:
        raise ValueError(f"no caption prompts for language {language!r}; available: {sorted(CAPTION_PROMPTS)}")
    pool = CAPTION_PROMPTS[language]
    return pool[0] if rng is None else rng.choice(pool)
