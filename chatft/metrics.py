"""ROUGE-1/2/L and BLEU-4 of generated text, as LLaMA-Factory's ComputeSimilarity computes them.

Per record:
- ROUGE: prediction and reference segmented with jieba and joined with spaces, scored by rouge_chinese; the f
  value x 100. When either side is empty after segmentation (nothing but white space), every ROUGE f is 0
  (rouge_chinese itself would fail on it).
- BLEU-4: nltk's sentence_bleu over CHARACTERS, smoothing method3, x 100.
Each value is rounded to 4 decimals per record, then averaged over the records.

ROUGE is the same in ChatGLM3's finetune_demo (finetune_hf.py compute_metrics), which has no empty-text guard.
Its BLEU-4 differs: over jieba words, as a 0-1 fraction, unrounded. The character-level x 100 value used here is
the one LLaMA-Factory reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_ROUGE_NAMES = METRIC_NAMES[:3]


def _segment(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." on every run
    return list(jieba.cut(text))


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """The four scores (0-100, rounded to 4 decimals) of one prediction against its reference."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, ref = _segment(prediction), _segment(reference)
    if not " ".join(hypothesis).split() or not " ".join(ref).split():
        rouge = dict.fromkeys(_ROUGE_NAMES, 0.0)
    else:
        scores = Rouge().get_scores(" ".join(hypothesis), " ".join(ref))[0]
        rouge = {k: round(scores[k]["f"] * 100, 4) for k in _ROUGE_NAMES}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {**rouge, "bleu-4": round(float(bleu) * 100, 4)}


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The mean of each per-record score over the records."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no records to score")
    per_record = [score_pair(p, r) for p, r in zip(predictions, references, strict=True)]
    return {k: sum(s[k] for s in per_record) / len(per_record) for k in METRIC_NAMES}


def compute_generation_metrics(pred_texts: Sequence[str], ref_texts: Sequence[str]) -> dict[str, float]:
    """score() under the name a Trainer's compute_metrics wrapper calls (see make_compute_metrics)."""
    return score(pred_texts, ref_texts)


def make_compute_metrics(tokenizer: Any, ignore_index: int = -100) -> Callable[[Any], dict[str, float]]:
    """A Trainer `compute_metrics` for generated ids (Seq2SeqTrainer with predict_with_generate): decodes
    predictions and labels (ignore_index -> pad, special tokens skipped) and scores the texts."""
    import numpy as np

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        preds, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        pad = tokenizer.pad_token_id
        preds = np.where(preds == ignore_index, pad, preds)
        labels = np.where(labels == ignore_index, pad, labels)
        pred_texts = tokenizer.batch_decode(preds, skip_special_tokens=True)
        ref_texts = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return compute_generation_metrics([t.strip() for t in pred_texts], [t.strip() for t in ref_texts])

    return compute_metrics
