"""VQA accuracy (VQAv2's standard metric) and multiple-choice accuracy.

An answer is normalised as the VQA evaluation normalises both the prediction and the ten human
answers: line breaks and tabs become spaces; punctuation is removed or becomes a space
(_strip_punctuation); lower case; number words up to ten become digits;
the articles a, an and the go; common contractions written without their apostrophe get it back
("dont" -> "don't"). The accuracy of a prediction against the ten answers is, averaged over the ten
ways of leaving one answer out, min(#remaining answers equal to it / 3, 1): an answer three humans
gave counts fully.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations

NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# Contractions as annotators typed them without the apostrophe, and their written form.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "id": "i'd", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
PUNCTUATION = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$~|:'")
COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # "3.5" keeps its period, "dog." loses it


def _strip_punctuation(text: str) -> str:
    """A mark next to a space goes ("dog !" -> "dog "), as does every mark of an answer with a
    comma between digits ("1,000" -> "1000"); a mark inside a word separates it ("black/white" ->
    "black white"). Then periods go, except before a digit."""
    joins_digits = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        beside_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if beside_space or joins_digits else " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_answer(answer: str) -> str:
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()).lower()
    words = []
    for word in text.split():
        word = NUMBERS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy against its human answers (usually ten)."""
    if not answers:
        raise ValueError("a VQA question needs its human answers")
    mine = normalize_answer(prediction)
    theirs = [normalize_answer(a) for a in answers]
    if len(theirs) == 1:
        return float(mine == theirs[0])
    subsets = list(combinations(range(len(theirs)), len(theirs) - 1))
    return sum(min(sum(theirs[i] == mine for i in subset) / 3.0, 1.0) for subset in subsets) / len(subsets)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy over questions, 0..100."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer sets")
    if not predictions:
        return 0.0
    return 100.0 * sum(vqa_score(p, a) for p, a in zip(predictions, answers)) / len(predictions)


def choice_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option a free-text answer picks: a leading letter ("B", "(b)", "B. red") or the one
    option whose text it equals (after normalisation); None when it picks none."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    match = re.match(r"\s*\(?([A-Za-z])[\).:\s]|\s*\(?([A-Za-z])\)?\s*$", prediction)
    if match:
        letter = (match.group(1) or match.group(2)).upper()
        if letter in letters:
            return letter
    mine = normalize_answer(prediction)
    hits = [letter for letter, option in zip(letters, options) if normalize_answer(option) == mine]
    return hits[0] if len(hits) == 1 else None


def choice_accuracy(predictions: Sequence[str], options: Sequence[Sequence[str]], correct: Sequence[str]) -> float:
    """Multiple-choice accuracy, 0..100: the share of predictions that pick the correct letter."""
    if not len(predictions) == len(options) == len(correct):
        raise ValueError("predictions, options and correct letters differ in number")
    if not predictions:
        return 0.0
    hits = sum(choice_letter(p, o) == c.strip().upper() for p, o, c in zip(predictions, options, correct))
    return 100.0 * hits / len(predictions)
