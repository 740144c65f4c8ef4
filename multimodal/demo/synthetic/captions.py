"""Wording a scene: `describe(scene, language)` from a small grammar per language (English, Spanish,
Catalan, with gender and number agreement), and every caption-level content a scene can have."""

from __future__ import annotations

import functools
from collections.abc import Iterator

from multimodal.demo.synthetic.scenes import COLOURS, PAIR_LAYOUTS, POSITIONS, SHAPE_KINDS, Scene

LANGUAGES: tuple[str, ...] = ("en", "es", "ca")
LANGUAGE_NAMES: dict[str, str] = {"en": "English", "es": "Spanish", "ca": "Catalan"}

# English: (singular, plural). Spanish and Catalan: (singular, plural, gender).
_NOUNS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {"circle": ("circle", "circles"), "square": ("square", "squares"),
           "triangle": ("triangle", "triangles"), "star": ("star", "stars"),
           "heart": ("heart", "hearts"), "cross": ("cross", "crosses"),
           "diamond": ("diamond", "diamonds")},
    "es": {"circle": ("círculo", "círculos", "m"), "square": ("cuadrado", "cuadrados", "m"),
           "triangle": ("triángulo", "triángulos", "m"), "star": ("estrella", "estrellas", "f"),
           "heart": ("corazón", "corazones", "m"), "cross": ("cruz", "cruces", "f"),
           "diamond": ("rombo", "rombos", "m")},
    "ca": {"circle": ("cercle", "cercles", "m"), "square": ("quadrat", "quadrats", "m"),
           "triangle": ("triangle", "triangles", "m"), "star": ("estrella", "estrelles", "f"),
           "heart": ("cor", "cors", "m"), "cross": ("creu", "creus", "f"),
           "diamond": ("rombe", "rombes", "m")},
}

# Spanish and Catalan colour adjectives: (masc. sg., fem. sg., masc. pl., fem. pl.). Colours named
# after a fruit ("naranja", "taronja") stay invariable, as both academies recommend.
_COLOUR_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "es": {"red": ("rojo", "roja", "rojos", "rojas"),
           "orange": ("naranja", "naranja", "naranja", "naranja"),
           "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
           "green": ("verde", "verde", "verdes", "verdes"),
           "blue": ("azul", "azul", "azules", "azules"),
           "purple": ("morado", "morada", "morados", "moradas"),
           "black": ("negro", "negra", "negros", "negras")},
    "ca": {"red": ("vermell", "vermella", "vermells", "vermelles"),
           "orange": ("taronja", "taronja", "taronja", "taronja"),
           "yellow": ("groc", "groga", "grocs", "grogues"),
           "green": ("verd", "verda", "verds", "verdes"),
           "blue": ("blau", "blava", "blaus", "blaves"),
           "purple": ("morat", "morada", "morats", "morades"),
           "black": ("negre", "negra", "negres", "negres")},
}

_POSITION_PHRASES: dict[str, dict[str, str]] = {
    "en": {"centre": "in the centre", "left": "on the left", "right": "on the right",
           "top": "at the top", "bottom": "at the bottom"},
    "es": {"centre": "en el centro", "left": "a la izquierda", "right": "a la derecha",
           "top": "arriba", "bottom": "abajo"},
    "ca": {"centre": "al centre", "left": "a l'esquerra", "right": "a la dreta",
           "top": "a dalt", "bottom": "a baix"},
}


def describe(scene: Scene, language: str) -> str:
    """The caption of `scene` in `language` ("en", "es" or "ca"); it states only what is visible."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose one of {LANGUAGES}")
    return _caption(scene.content, language)


@functools.lru_cache(maxsize=None)
def _caption(content: tuple, language: str) -> str:
    layout, *shapes = content
    return {"en": _caption_en, "es": _caption_es, "ca": _caption_ca}[language](layout, shapes)


def _caption_en(layout: str, shapes: list[tuple]) -> str:
    def phrase(kind: str, colour: str, size: str | None = None) -> str:
        words = " ".join(w for w in (size, colour, _NOUNS["en"][kind][0]) if w)
        return ("an " if words[0] in "aeiou" else "a ") + words

    if len(shapes) == 1:
        kind, colour, size = shapes[0]
        if size == "large":
            return phrase(kind, colour, size)
        return f"{phrase(kind, colour, size)} {_POSITION_PHRASES['en'][layout]}"
    (k1, c1, _), (k2, c2, _) = shapes
    if (k1, c1) == (k2, c2):
        plural = f"two {c1} {_NOUNS['en'][k1][1]}"
        return f"{plural} side by side" if layout == "row" else f"{plural}, one above the other"
    if layout == "row":
        return f"{phrase(k1, c1)} on the left and {phrase(k2, c2)} on the right"
    return f"{phrase(k1, c1)} above {phrase(k2, c2)}"


def _romance_phrase(language: str, kind: str, colour: str, size: str | None = None) -> str:
    # Article, noun, colour, size: the adjectives follow the noun and agree with its gender.
    singular, _, gender = _NOUNS[language][kind]
    feminine = gender == "f"
    article = "una" if feminine else "un"
    words = [article, singular, _COLOUR_WORDS[language][colour][1 if feminine else 0]]
    if size is not None:
        words.append({
            ("es", "small"): ("pequeño", "pequeña"), ("es", "large"): ("grande", "grande"),
            ("ca", "small"): ("petit", "petita"), ("ca", "large"): ("gran", "gran"),
        }[language, size][1 if feminine else 0])
    return " ".join(words)


def _romance_plural(language: str, kind: str, colour: str) -> tuple[str, bool]:
    _, plural, gender = _NOUNS[language][kind]
    feminine = gender == "f"
    two = "dues" if language == "ca" and feminine else "dos"
    return f"{two} {plural} {_COLOUR_WORDS[language][colour][3 if feminine else 2]}", feminine


def _romance_single(language: str, layout: str, shape: tuple) -> str:
    # A large shape fills the centre, so its caption names no position.
    kind, colour, size = shape
    phrase = _romance_phrase(language, kind, colour, size)
    return phrase if size == "large" else f"{phrase} {_POSITION_PHRASES[language][layout]}"


def _caption_es(layout: str, shapes: list[tuple]) -> str:
    if len(shapes) == 1:
        return _romance_single("es", layout, shapes[0])
    (k1, c1, _), (k2, c2, _) = shapes
    if (k1, c1) == (k2, c2):
        plural, feminine = _romance_plural("es", k1, c1)
        one, other = ("una", "de la otra") if feminine else ("uno", "del otro")
        relation = "al lado" if layout == "row" else "encima"
        return f"{plural}, {one} {relation} {other}"
    first, second = _romance_phrase("es", k1, c1), _romance_phrase("es", k2, c2)
    if layout == "row":
        return f"{first} a la izquierda y {second} a la derecha"
    return f"{first} encima de {second}"


def _caption_ca(layout: str, shapes: list[tuple]) -> str:
    if len(shapes) == 1:
        return _romance_single("ca", layout, shapes[0])
    (k1, c1, _), (k2, c2, _) = shapes
    if (k1, c1) == (k2, c2):
        plural, feminine = _romance_plural("ca", k1, c1)
        one, other = ("una", "l'altra") if feminine else ("un", "l'altre")
        relation = "al costat" if layout == "row" else "damunt"
        return f"{plural}, {one} {relation} de {other}"
    first, second = _romance_phrase("ca", k1, c1), _romance_phrase("ca", k2, c2)
    if layout == "row":
        return f"{first} a l'esquerra i {second} a la dreta"
    # "de" elides before the vowel of "un" / "una": "damunt d'una estrella".
    return f"{first} damunt d'{second}"


def all_contents() -> Iterator[tuple]:
    """Every caption-level content a scene can have (what `Scene.content` returns)."""
    colours = tuple(COLOURS)
    for layout in POSITIONS:
        for kind in SHAPE_KINDS:
            for colour in colours:
                yield (layout, (kind, colour, "small"))
                if layout == "centre":
                    yield (layout, (kind, colour, "large"))
    objects = [(k, c) for k in SHAPE_KINDS for c in colours]
    for layout in PAIR_LAYOUTS:
        for first in objects:
            for second in objects:
                yield (layout, (*first, None), (*second, None))


def caption_of_content(content: tuple, language: str) -> str:
    """The caption for a content tuple from `all_contents()` (equal to `describe` of its scenes)."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose one of {LANGUAGES}")
    return _caption(tuple(content), language)
