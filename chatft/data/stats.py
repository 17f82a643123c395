"""What preparing the data gives (PreparedData: the dataset, its statistics, the located problems) and the report
on it: DataStats.lines() (counts, tokens per example, the split conversations, the closing tokens trained, the
skipped and truncated examples) and ChatGLM3's Sanity Check of an example, token by token.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from chatft.data.labels import IGNORE_INDEX
from chatft.data.schema import Problem

NOTES_SHOWN = 20  # skipped and truncated records named in the report (all are counted)


@dataclass
class DataStats:
    records_read: int = 0
    valid: int = 0
    invalid: int = 0
    skipped: int = 0  # examples left with no trained token (loss false everywhere, or after truncation)
    skipped_why: str = "no trained token left"  # what "skipped" means in lines()
    truncated: int = 0  # examples truncated
    # conversations the template made several examples of, those examples, their tokens, and the tokens of the
    # same conversations rendered whole (before truncation)
    split: int = 0
    split_examples: int = 0
    split_tokens: int = 0
    split_whole_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    trained_tokens: int = 0
    closing_tokens: dict[str, int] = field(default_factory=dict)  # token -> trained turns it closes
    # "FILE:LINE: skipped|truncated: why" of the first NOTES_SHOWN such records
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds of each stage of preprocessing, in order
    cache: str = ""  # the cache folder this came from ("" when tokenized in this run)
    prepared_by: str = ""  # the process that tokenized it ("rank 0, pid 123" or "pid 123")

    def lines(self) -> list[str]:
        out = [
            f"records read: {self.records_read}, valid: {self.valid}, invalid: {self.invalid}, "
            f"skipped ({self.skipped_why}): {self.skipped}, truncated: {self.truncated}, "
            f"examples: {len(self.lengths)}"
        ]
        if self.lengths:
            s = sorted(self.lengths)
            p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
            total = sum(s)
            out.append(
                f"tokens per example: min {s[0]}, median {statistics.median(s):g}, p95 {p95}, max {s[-1]}; "
                f"total {total}, trained {self.trained_tokens} ({100 * self.trained_tokens / total:.1f}%)"
            )
        if self.split:
            extra = self.split_tokens - self.split_whole_tokens
            out.append(
                f"split: {self.split} conversation(s) into {self.split_examples} examples (the chat template renders "
                "earlier turns differently once later turns follow: each turn is trained in the context it is "
                f"generated in), {self.split_tokens} tokens instead of {self.split_whole_tokens} whole "
                f"({extra:+d})"
            )
        if self.closing_tokens:
            closers = ", ".join(f"{tok!r} x{n}" for tok, n in self.closing_tokens.items())
            out.append(f"end of turn trained: {closers}")
        shown = len(self.notes)
        if shown:
            more = self.skipped + self.truncated - shown
            out.append(f"skipped and truncated examples{f' (the first {shown})' if more > 0 else ''}:")
            out += [f"  {note}" for note in self.notes]
        by = f", prepared by {self.prepared_by}" if self.prepared_by else ""
        source = f" (loaded from the cache {self.cache}{by})" if self.cache else ""
        stages = ", ".join(f"{name} {s:.1f} s" for name, s in self.stages.items())
        out.append(f"preprocessing took {self.seconds:.1f} s{source}{f': {stages}' if stages else ''}")
        return out


@dataclass
class PreparedData:
    dataset: datasets.Dataset  # columns: input_ids, labels, file, record
    stats: DataStats
    problems: list[Problem]
    formats: dict[str, str]
    folder: Path | None = None  # the cache entry the dataset is read from (None: not cached)


def sanity_check_lines(
    input_ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase
) -> list[str]:
    """ChatGLM3's Sanity Check: each token's text, id and label (-100: not trained), one line per token; where
    a byte-level tokenizer (SmolLM2, Qwen, Llama-3) splits a character over several tokens, one line for the
    smallest run of tokens that decodes to whole characters, with all of its ids and labels. A run only partly
    trained (which the label rule never makes) is marked."""
    lines = ["Sanity Check >>>>>>>>>>>>>"]
    for start, stop in character_runs(input_ids, tokenizer):
        ids, labs = input_ids[start:stop], labels[start:stop]
        text = repr(tokenizer.decode(ids))
        if len(ids) == 1:
            lines.append(f"{text:>20}: {ids[0]:6d} -> {labs[0]:6d}")
            continue
        trained = [label != IGNORE_INDEX for label in labs]
        mark = "   <- partly trained!" if any(trained) and not all(trained) else ""
        lines.append(
            f"{text:>20}: {', '.join(map(str, ids))} -> {', '.join(str(label) for label in labs)}{mark}"
        )
    lines.append("<<<<<<<<<<<<< Sanity Check")
    return lines


MAX_RUN = 8  # a run that does not decode whole after this many tokens (invalid bytes) is shown as it is


def character_runs(input_ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    """[start, stop) of the smallest runs of tokens that each decode to whole characters (no U+FFFD)."""
    runs, start = [], 0
    while start < len(input_ids):
        stop = start + 1
        while (
            stop < len(input_ids)
            and stop - start < MAX_RUN
            and "\ufffd" in tokenizer.decode(input_ids[start:stop])
        ):
            stop += 1
        runs.append((start, stop))
        start = stop
    return runs
