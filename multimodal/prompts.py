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
    # One canonical request in each of Salamandra's other languages (naming the language, which
    # is also what makes so short a text identifiable: tests/multimodal/evaluation checks each).
    "bg": ("Опиши изображението на български език.",),
    "cs": ("Popiš obrázek v češtině.",),
    "cy": ("Disgrifiwch y ddelwedd yn Gymraeg.",),
    "da": ("Beskriv billedet på dansk.",),
    "de": ("Beschreibe das Bild auf Deutsch.",),
    "el": ("Περίγραψε την εικόνα στα ελληνικά.",),
    "et": ("Kirjelda pilti eesti keeles.",),
    "eu": ("Deskribatu irudia euskaraz.",),
    "fi": ("Kuvaile kuvaa suomeksi.",),
    "fr": ("Décris l'image en français.",),
    "ga": ("Déan cur síos ar an íomhá i nGaeilge.",),
    "gl": ("Describe a imaxe en galego.",),
    "hr": ("Opiši sliku na hrvatskom jeziku.",),
    "hu": ("Írd le a képet magyarul.",),
    "it": ("Descrivi l'immagine in italiano.",),
    "lt": ("Apibūdink paveikslėlį lietuviškai.",),
    "lv": ("Apraksti attēlu latviešu valodā.",),
    "mt": ("Iddeskrivi l-istampa bil-Malti.",),
    "nl": ("Beschrijf de afbeelding in het Nederlands.",),
    "nn": ("Skildra biletet på nynorsk.",),
    "no": ("Beskriv bildet på norsk.",),
    "oc": ("Descriu l'imatge en occitan.",),
    "pl": ("Opisz obraz po polsku.",),
    "pt": ("Descreve a imagem em português.",),
    "ro": ("Descrie imaginea în limba română.",),
    "ru": ("Опиши изображение на русском языке.",),
    "sh": ("Opiši sliku na srpskohrvatskom jeziku.",),
    "sk": ("Opíš obrázok po slovensky.",),
    "sl": ("Opiši sliko v slovenščini.",),
    "sr": ("Опиши слику на српском језику.",),
    "sv": ("Beskriv bilden på svenska.",),
    "uk": ("Опиши зображення українською мовою.",),
}


def caption_prompt(language: str, rng: random.Random | None = None) -> str:
    """A prompt from `language`'s pool: drawn with `rng`, or the first (canonical) one without."""
    if language not in CAPTION_PROMPTS:
        raise ValueError(f"no caption prompts for language {language!r}; available: {sorted(CAPTION_PROMPTS)}")
    pool = CAPTION_PROMPTS[language]
    return pool[0] if rng is None else rng.choice(pool)
