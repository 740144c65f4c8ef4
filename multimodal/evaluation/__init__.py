"""Evaluation a researcher can cite: caption metrics (CIDEr-D, BLEU-4, chrF++), VQA and
multiple-choice accuracy, and language fidelity over Salamandra's 35 languages. Metrics are plain
functions of strings.

- captions.py  cider_d, bleu4, chrf (and caption_tokens, the tokenization of the first two)
- vqa.py       normalize_answer, vqa_score, vqa_accuracy, choice_letter, choice_accuracy
- language.py  SALAMANDRA_LANGUAGES, identify_language, language_fidelity
"""

from multimodal.evaluation.captions import bleu4, caption_tokens, chrf, cider_d
from multimodal.evaluation.language import SALAMANDRA_LANGUAGES, identify_language, language_fidelity
from multimodal.evaluation.vqa import choice_accuracy, choice_letter, normalize_answer, vqa_accuracy, vqa_score

__all__ = ["SALAMANDRA_LANGUAGES", "bleu4", "caption_tokens", "chrf", "choice_accuracy", "choice_letter", "cider_d",
           "identify_language", "language_fidelity", "normalize_answer", "vqa_accuracy", "vqa_score"]
