"""Caption metrics, as papers report them: CIDEr-D (COCO's definition), BLEU-4 and chrF++.

Every function takes the predictions (one string each) and their references (one or more strings
each) and returns the corpus score on the scale papers use (CIDEr-D x10, i.e. ~1.0 for a good COCO
model; BLEU and chrF 0..100) with, for CIDEr-D, the per-item scores.

Tokens for CIDEr-D and BLEU-4: `caption_tokens` (lower case, words of letters and digits in any
script, punctuation dropped), close to what COCO's PTB tokenizer gives for English without its Java
dependency, and usable for the 35 languages of Salamandra. chrF++ works on characters (and word
bigrams) and needs no tokenization.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)
MAX_N = 4
SIGMA = 6.0  # CIDEr-D's length penalty: a Gaussian of the length difference


def caption_tokens(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"items {empty[:5]} have no reference")
    return refs


def _ngrams(tokens: list[str]) -> list[Counter]:
    return [Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, MAX_N + 1)]


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015, as COCO's evaluation computes it): per n (1..4), the cosine of
    tf-idf n-gram vectors where the candidate's counts are clipped at the reference's, times a
    Gaussian penalty of the length difference (sigma 6), averaged over n and over the references,
    x10. Document frequencies come from the references of this corpus (one document per item).
    Returns (mean over items, per-item scores)."""
    refs = _check(predictions, references)
    ref_grams = [[_ngrams(caption_tokens(r)) for r in item] for item in refs]
    document_frequency: Counter = Counter()
    for item in ref_grams:
        document_frequency.update({gram for grams in item for counts in grams for gram in counts})
    log_documents = math.log(float(len(refs)))

    def vector(grams: list[Counter]) -> tuple[list[dict], list[float], int]:
        vectors, norms = [], []
        for counts in grams:
            vec = {gram: tf * (log_documents - math.log(max(1.0, document_frequency[gram])))
                   for gram, tf in counts.items()}
            vectors.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        # COCO's scorer measures a caption's length in bigrams (one less than its words; 0 for an
        # empty one): the same difference for any two non-empty captions, not for an empty one.
        return vectors, norms, sum(grams[1].values())

    scores = []
    for prediction, item in zip(predictions, ref_grams):
        hyp_vec, hyp_norm, hyp_len = vector(_ngrams(caption_tokens(prediction)))
        total = [0.0] * MAX_N
        for grams in item:
            ref_vec, ref_norm, ref_len = vector(grams)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * SIGMA ** 2))
            for n in range(MAX_N):
                dot = sum(min(value, ref_vec[n].get(gram, 0.0)) * ref_vec[n].get(gram, 0.0)
                          for gram, value in hyp_vec[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    dot /= hyp_norm[n] * ref_norm[n]
                total[n] += dot * penalty
        scores.append(sum(total) / MAX_N / len(item) * 10.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (sacrebleu) on caption_tokens, 0..100: the closest reference length for the
    brevity penalty, as COCO's; no smoothing, so a corpus without a 4-gram match scores 0."""
    from sacrebleu.metrics import BLEU

    refs = _check(predictions, references)
    width = max(len(item) for item in refs)
    # sacrebleu wants reference streams of equal length: missing references are None.
    streams = [[" ".join(caption_tokens(item[i])) if i < len(item) else None for item in refs] for i in range(width)]
    hypotheses = [" ".join(caption_tokens(p)) for p in predictions]
    return BLEU(tokenize="none", smooth_method="none").corpus_score(hypotheses, streams).score


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF++ (sacrebleu: character 6-grams and word bigrams, beta 2), 0..100."""
    from sacrebleu.metrics import CHRF

    refs = _check(predictions, references)
    width = max(len(item) for item in refs)
    streams = [[item[i] if i < len(item) else None for item in refs] for i in range(width)]
    return CHRF(word_order=2).corpus_score(list(predictions), streams).score
