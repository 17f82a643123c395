"""chatft.metrics: ROUGE-1/2/L (jieba words) and BLEU-4 (characters) against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from toy import ids, make_tokenizer
from transformers import EvalPrediction

from chatft.metrics import compute_generation_metrics, make_compute_metrics, score, score_pair

ALL = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def test_identical_texts_score_100():
    assert score_pair("今天天气很好", "今天天气很好") == dict.fromkeys(ALL, 100.0)
    assert score_pair("hello there !", "hello there !") == dict.fromkeys(ALL, 100.0)


def test_partial_overlap_worked_by_hand():
    # words a b c d vs a b x d: 3 of 4 unigrams (P = R = 3/4), 1 of 3 bigrams (ab), LCS a b d = 3 of 4.
    # characters "a b c d" vs "a b x d" (7 each, no brevity penalty): 1-grams 6/7, 2-grams 4/6 ("a ", " b", "b ",
    # " d"), 3-grams 2/5 ("a b", " b "), 4-grams 1/4 ("a b "); BLEU-4 = their geometric mean.
    bleu = (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25 * 100
    expected = {"rouge-1": 75.0, "rouge-2": 33.3333, "rouge-l": 75.0, "bleu-4": round(bleu, 4)}
    assert score_pair("a b c d", "a b x d") == expected
    assert expected["bleu-4"] == 48.8923


def test_chinese_pair_worked_by_hand():
    # jieba: 我/爱/北京 vs 我/爱/上海: unigrams 2/3, bigrams 1/2 (我 爱), LCS 2/3.
    # characters 我爱北京 vs 我爱上海: 1-grams 2/4, 2-grams 1/3, 3-grams 0/2 and 4-grams 0/1, which smoothing method3
    # replaces by 1 / (2^k x the n-gram count), k counting the zero precisions: 1/(2*2) and 1/(4*1).
    bleu = (2 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25 * 100
    expected = {"rouge-1": 66.6667, "rouge-2": 50.0, "rouge-l": 66.6667, "bleu-4": round(bleu, 4)}
    assert score_pair("我爱北京", "我爱上海") == expected


@pytest.mark.parametrize(("pred", "ref"), [("", "我爱上海"), ("   ", "abc"), ("abc", "\n")])
def test_an_empty_side_scores_zero(pred, ref):
    assert score_pair(pred, ref) == dict.fromkeys(ALL, 0.0)


def test_score_is_the_mean_of_the_rounded_per_record_scores():
    result = score(["a b c d", "我爱北京"], ["a b x d", "我爱上海"])
    assert result["rouge-1"] == pytest.approx((75.0 + 66.6667) / 2)
    assert result["rouge-2"] == pytest.approx((33.3333 + 50.0) / 2)
    assert result["bleu-4"] == pytest.approx((48.8923 + 31.9472) / 2)
    assert compute_generation_metrics(["a b c d", "我爱北京"], ["a b x d", "我爱上海"]) == result
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no records"):
        score([], [])


def test_trainer_compute_metrics_decodes_ids():
    tokenizer = make_tokenizer()
    pad = tokenizer.pad_token_id
    preds = np.array([ids("hello", " ", "there"), ids("fine", "<|im_end|>", "<|im_end|>")])
    labels = np.array([ids("hello", " ", "there"), [-100, *ids("bye", "<|im_end|>")]])
    assert pad == ids("<|im_end|>")[0]
    metrics = make_compute_metrics(tokenizer)(EvalPrediction(predictions=preds, label_ids=labels))
    expected = score(["hello   there", "fine"], ["hello   there", "bye"])
    assert metrics == expected and metrics["rouge-1"] == 50.0
