"""The evaluation metrics against independent references: CIDEr-D and BLEU-4 against COCO's own
scorers (pycocoevalcap, given the same tokens), chrF++ against sacrebleu's command line, the VQA
normalisation and accuracy on the evaluation's documented cases, language identification on the
caption prompts of all 35 languages."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from multimodal.evaluation import (SALAMANDRA_LANGUAGES, bleu4, caption_tokens, chrf, choice_accuracy, choice_letter,
                                   cider_d, identify_language, language_fidelity, normalize_answer, vqa_accuracy,
                                   vqa_score)
from multimodal.evaluation.language import same_language
from multimodal.prompts import CAPTION_PROMPTS

SENTENCES = [
    "A black dog runs along the beach.", "Two children play football in a park.", "A red car parked on a street.",
    "A man rides a bicycle down a hill.", "A plate of pasta with tomato sauce.", "A cat sleeps on a sofa.",
    "Boats in a harbour at sunset.", "A woman reads a book under a tree.", "A train crosses a bridge.",
    "Snow covers the mountains behind a lake.",
]


def corpus(seed: int, items: int = 40):
    """Predictions and 1 to 5 references per item: edited copies of the sentences (words dropped,
    swapped, repeated), some identical, one empty prediction."""
    rng = random.Random(seed)

    def edit(sentence: str) -> str:
        words = sentence.split()
        for _ in range(rng.randint(0, 3)):
            i = rng.randrange(len(words))
            action = rng.choice(["drop", "repeat", "swap"])
            if action == "drop" and len(words) > 2:
                words.pop(i)
            elif action == "repeat":
                words.insert(i, words[i])
            else:
                j = rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
        return " ".join(words)

    predictions, references = [], []
    for item in range(items):
        base = SENTENCES[item % len(SENTENCES)]
        references.append([edit(base) for _ in range(rng.randint(1, 5))])
        predictions.append("" if item == 7 else edit(rng.choice([base, rng.choice(SENTENCES)])))
    return predictions, references


def coco_inputs(predictions, references):
    gts = {i: [" ".join(caption_tokens(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(caption_tokens(p))] for i, p in enumerate(predictions)}
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_equals_coco_scorer(seed):
    from pycocoevalcap.cider.cider import Cider

    predictions, references = corpus(seed)
    mine, per_item = cider_d(predictions, references)
    theirs, their_items = Cider().compute_score(*coco_inputs(predictions, references))
    assert mine == pytest.approx(float(theirs), rel=1e-9)
    assert per_item == pytest.approx([float(s) for s in their_items], rel=1e-9, abs=1e-12)
    assert 0 < mine < 10


@pytest.mark.parametrize("seed", [0, 1])
def test_bleu4_equals_coco_scorer(seed):
    from pycocoevalcap.bleu.bleu import Bleu

    predictions, references = corpus(seed)
    theirs, _ = Bleu(4).compute_score(*coco_inputs(predictions, references), verbose=0)
    assert bleu4(predictions, references) == pytest.approx(100 * theirs[3], rel=1e-6)


def test_chrf_plus_plus_equals_the_sacrebleu_command_line(tmp_path):
    predictions, references = corpus(3)
    references = [refs[:1] for refs in references]  # the command line takes one file per reference stream
    (tmp_path / "hyp.txt").write_text("\n".join(predictions) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(r[0] for r in references) + "\n")
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                          "-m", "chrf", "--chrf-word-order", "2", "-b"], capture_output=True, text=True, check=True)
    assert chrf(predictions, references) == pytest.approx(float(out.stdout.strip()), abs=0.05)  # the CLI prints 1 decimal


def test_caption_metrics_refuse_misaligned_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        bleu4(["a"], [[]])
    assert cider_d(["the dog"], ["the dog"])[0] == 0.0  # one item: every n-gram is in every document (idf 0)


def test_vqa_normalisation_follows_the_evaluation_rules():
    cases = {"Two": "2", "none": "0", "a dog.": "dog", "The Man": "man", "dont know": "don't know", "yes!": "yes",
             "black/white": "black white", "1,000": "1000", "3.5": "3.5", "dog !": "dog", "  Ten\n": "10",
             "an apple": "apple", "its": "its", "whats that": "what's that"}
    for answer, normalised in cases.items():
        assert normalize_answer(answer) == normalised, answer


def test_vqa_accuracy_is_min_of_a_third_of_the_others_averaged_over_leave_one_out():
    def brute_force(prediction, answers):
        total = 0.0
        for left_out in range(len(answers)):
            others = answers[:left_out] + answers[left_out + 1:]
            total += min(1.0, sum(normalize_answer(a) == normalize_answer(prediction) for a in others) / 3)
        return total / len(answers)

    rng = random.Random(0)
    for _ in range(200):
        answers = [rng.choice(["2", "two", "3", "yes", "no", "a dog", "dog"]) for _ in range(10)]
        prediction = rng.choice(["2", "Two", "yes", "dog", "cat"])
        assert vqa_score(prediction, answers) == pytest.approx(brute_force(prediction, answers))
    assert vqa_score("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_score("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy(["yes", "no"], [["yes"] * 10, ["yes"] * 10]) == 50.0


def test_choice_accuracy_reads_letters_and_option_texts():
    options = ["red", "green", "blue"]
    assert [choice_letter(p, options) for p in ["B", "(c)", "A. red", "green", "b) green", "purple", "the sky"]] == \
        ["B", "C", "A", "B", "B", None, None]
    assert choice_accuracy(["B", "blue", "x"], [options] * 3, ["B", "C", "A"]) == pytest.approx(200 / 3)


def test_every_salamandra_language_has_a_caption_prompt_in_that_language():
    assert set(CAPTION_PROMPTS) == set(SALAMANDRA_LANGUAGES) and len(SALAMANDRA_LANGUAGES) == 35
    for language, pool in CAPTION_PROMPTS.items():
        for prompt in pool:
            found = identify_language(prompt)
            # Serbo-Croatian has no model of its own: one of its standard forms.
            assert same_language(found, language, grouped=language == "sh"), (language, found, prompt)


def test_language_fidelity_counts_strict_and_grouped_agreement():
    predictions = ["Un perro negro corre por la playa.", "A black dog runs along the beach.",
                   "Un gos negre corre per la platja del poble.", "Pas na plaži.", "1234", "Ein Hund am Strand."]
    asked = ["es", "es", "ca", "sh", "en", "de"]
    result = language_fidelity(predictions, asked)
    per = result["per_language"]
    assert per["es"] == {"strict": 0.5, "grouped": 0.5, "count": 2, "found": {"es": 1, "en": 1}}
    assert per["en"]["found"] == {"none": 1} and per["de"]["strict"] == 1.0
    assert per["sh"]["strict"] == 0.0 and per["sh"]["grouped"] == 1.0
    assert result["grouped"] >= result["strict"]
    with pytest.raises(ValueError, match="not among Salamandra's"):
        language_fidelity(["hello"], ["ja"])
