"""Preference examples -> token ids, rendered and labelled exactly as SFT renders and labels them.

For each reply, the conversation plus that reply is encoded by chatft.data.templates.encode_chat with the reply as
the only trained turn (earlier assistant turns are context), so it is rendered exactly as SFT renders a conversation's
last turn: in its own generation context (a template that rewrites the history, Qwen3 dropping earlier answers'
reasoning, Mistral moving the system text, gives the prompt as the model sees it when it writes the reply), its
reasoning (Message.reasoning) included as the template writes it. The reply's ids are its trained tokens, i.e. its
text after the generation prompt and exactly one closing token (<|im_end|>, the next role's token, or an appended
EOS), and the prompt is every token before them. Whatever the template writes after the closing token (ChatML's
newline) is left out, as SFT leaves it untrained. A reply that starts with white space can join the prompt's last
token (ChatML's "\n" after `assistant` and a reply's leading "\n" are one token "\n\n"), so the prompts before the two
replies can end differently: the pair's shared prompt ends at the last token both share, and the tokens after it
belong to each reply, as SFT trains a token that holds any trained character. input-output records are encoded as
SFT encodes them raw: the prompt with the tokenizer's prefix tokens, the reply plus EOS.

Truncation to max_seq_length, as SFT truncates (whole turns first; a reply is never cut, since its closing token
is what the model must learn): while the prompt and the longer reply do not fit, the earliest exchange of the
conversation (a user turn and what answers it; a system message stays) is dropped and the rest rendered again; a
pair that does not fit with only its last user turn left is skipped. A raw prompt has no turns: it is cut to fit
(its start kept, as --max_source_length cuts it). Both are counted, the first NOTES_SHOWN of each named.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import datasets
from transformers import PreTrainedTokenizerBase

from chatft.args import check_lengths
from chatft.data.dataset import (
    NOTES_SHOWN,
    DataStats,
    check_tokenizer,
    sanity_check_lines,
    tools_fallback_note,
)
from chatft.data.schema import Conversation, Message, Problem
from chatft.data.templates import (
    IGNORE_INDEX,
    Template,
    TemplateError,
    encode_chat,
    encode_raw,
    get_template,
)
from chatft.preference.formats import PreferenceExample, load_preferences


@dataclass
class Encoded:
    """One training example: a pair (rejected_ids set) or KTO's labelled reply (label set)."""

    prompt_ids: list[int]
    chosen_ids: list[int]  # KTO: the reply
    rejected_ids: list[int] | None
    label: bool | None
    closers: list[int]
    note: str = ""  # "" whole, "truncated: ...", "skipped: ..." (then the ids are empty)

    @property
    def lengths(self) -> list[int]:
        replies = [self.chosen_ids] + ([self.rejected_ids] if self.rejected_ids is not None else [])
        return [len(self.prompt_ids) + len(r) for r in replies]


def encode_reply(
    conv: Conversation,
    reply: Message,
    tokenizer: PreTrainedTokenizerBase,
    template: Template | None,
    max_source_length: int | None = None,
) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt ids, reply ids, closing tokens, whether the raw prompt was cut by max_source_length)."""
    if conv.raw:
        enc = encode_raw(Conversation([conv.messages[-1], reply], raw=True), tokenizer, max_source_length)
    elif template is None:
        raise TemplateError("the tokenizer has no chat template; choose a native one with --template")
    else:
        context = [replace(m, loss=False) if m.role == "assistant" else m for m in conv.messages]
        enc = encode_chat(Conversation([*context, reply], tools=conv.tools), tokenizer, template)
    start = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    stop = enc.turn_ends[-1]
    assert all(label != IGNORE_INDEX for label in enc.labels[start:stop]), "a reply is trained whole"
    return enc.input_ids[:start], enc.input_ids[start:stop], enc.closers, enc.cut


def encode_example(
    conv: Conversation,
    replies: list[Message],
    label: bool | None,
    tokenizer: PreTrainedTokenizerBase,
    template: Template | None,
    max_seq_length: int,
    max_source_length: int | None = None,
) -> Encoded:
    """One pair (two replies) or one labelled reply, truncated as the module docstring says."""
    first_length, dropped = None, 0
    while True:
        parts = shared_prompt(
            [encode_reply(conv, r, tokenizer, template, max_source_length) for r in replies]
        )
        prompt = parts[0][0]
        longest = max(len(ids) for _, ids, _, _ in parts)
        first_length = first_length or len(prompt) + longest
        cut = any(c for *_, c in parts)
        if len(prompt) + longest <= max_seq_length:
            break
        if conv.raw and max_seq_length - longest >= 1:
            prompt, cut = prompt[: max_seq_length - longest], True
            break
        shorter = None if conv.raw else drop_first_exchange(conv)
        if shorter is None:
            need = len(prompt) + longest
            what = "its prompt" if conv.raw else "its prompt's last user turn"
            note = (
                f"skipped: {what} and the longer reply need {need} tokens, above max_seq_length {max_seq_length} "
                "(a reply is never cut)"
            )
            return Encoded([], [], None if len(replies) == 1 else [], label, [], note)
        conv, dropped = shorter, dropped + 1
    note = ""
    if dropped:
        total = len(prompt) + longest
        note = f"truncated: {first_length} -> {total} tokens ({dropped} earliest exchange(s) dropped from the prompt)"
    elif cut:
        note = "truncated: the raw prompt was cut (max_source_length or max_seq_length)"
    closers = [c for _, _, closers, _ in parts for c in closers]
    rejected = parts[1][1] if len(parts) > 1 else None
    return Encoded(prompt, parts[0][1], rejected, label, closers, note)


def drop_first_exchange(conv: Conversation) -> Conversation | None:
    """The conversation without its earliest exchange (a user turn and everything up to the next user turn);
    system messages stay. None when only the last user turn is left."""
    messages = conv.messages
    head = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    users = [i for i, m in enumerate(rest) if m.role == "user"]
    if len(users) < 2:
        return None
    return Conversation(head + rest[users[1] :], tools=conv.tools, raw=conv.raw)


def shared_prompt(
    parts: list[tuple[list[int], list[int], list[int], bool]],
) -> list[tuple[list[int], list[int], list[int], bool]]:
    """encode_reply's parts of a pair with one prompt: the tokens all their prompts share (the text before the
    replies is the same; only a token joined with the start of a reply can differ), each prompt's tokens after
    them moved to the start of its reply."""
    prompts = [prompt for prompt, *_ in parts]
    common = 0
    while all(common < len(p) for p in prompts) and len({p[common] for p in prompts}) == 1:
        common += 1
    return [(prompt[:common], prompt[common:] + reply, closers, cut) for prompt, reply, closers, cut in parts]


# ---------------------------------------------------------------------------------------------------- data sets

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")


@dataclass
class PreparedPreferences:
    """dataset columns: pairs prompt_ids, chosen_ids, rejected_ids; KTO prompt_ids, completion_ids, label; both
    file and record. stats: as SFT's, an example being one sequence (a pair is two: prompt + each reply)."""

    dataset: datasets.Dataset
    stats: DataStats
    problems: list[Problem]
    formats: dict[str, str]
    unpaired: bool
    pairs: int = 0  # examples of the data set: pairs, or KTO's labelled replies


def prepare_preferences(
    paths: list[str],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    template_name: str | None,
    max_seq_length: int = 2048,
    max_source_length: int | None = None,
    unpaired: bool = False,
    log: Callable[[str], None] = print,
    chat_template_kwargs: str | dict | None = None,
) -> PreparedPreferences:
    """Read, validate and encode preference data. unpaired (KTO): one example per labelled reply, and a pair
    gives two (chosen true, rejected false); otherwise every record must be a pair. chat_template_kwargs reach
    every rendering, as in SFT."""
    start = time.perf_counter()
    check_lengths(max_seq_length, max_source_length, None)
    check_tokenizer(tokenizer)
    loaded = load_preferences(paths, fmt, log=log)
    problems = list(loaded.problems)
    examples: list[tuple[str, int, PreferenceExample]] = []
    for name, line, ex in loaded.records:
        if not unpaired and not ex.paired:
            problems.append(
                Problem(name, line, "rejected", "missing: this stage needs pairs (a KTO record has one)")
            )
        else:
            examples.append((name, line, ex))
    chats = [ex.conversation for _, _, ex in examples if not ex.conversation.raw]
    template = get_template(template_name, tokenizer, chat_template_kwargs) if chats else None
    note = tools_fallback_note(template, tokenizer, chats)
    if note:
        log(note)
    columns: dict[str, list] = {
        k: [] for k in (*(UNPAIRED_COLUMNS if unpaired else PAIR_COLUMNS), "file", "record")
    }
    stats = DataStats(records_read=loaded.records_read, skipped_why="a reply does not fit max_seq_length")
    closers: Counter[int] = Counter()
    failed: set[tuple[str, int]] = set()
    for name, line, ex in examples:
        units = _units(ex, unpaired)
        for replies, label in units:
            try:
                enc = encode_example(
                    ex.conversation, replies, label, tokenizer, template, max_seq_length, max_source_length
                )
            except TemplateError as e:
                problems.append(Problem(name, line, "(template)", str(e)))
                failed.add((name, line))
                break
            if enc.note and len(stats.notes) < NOTES_SHOWN:
                stats.notes.append(f"{name}:{line}: {enc.note}")
            if enc.note.startswith("skipped"):
                stats.skipped += 1
                continue
            stats.truncated += bool(enc.note)
            _add(columns, enc, unpaired, name, line)
            stats.lengths += enc.lengths
            stats.trained_tokens += len(enc.chosen_ids) + len(enc.rejected_ids or [])
            closers.update(enc.closers)
    stats.valid = len(examples) - len(failed)
    stats.invalid = loaded.invalid + (len(loaded.records) - len(examples)) + len(failed)
    stats.closing_tokens = {tokenizer.convert_ids_to_tokens(c): n for c, n in closers.most_common()}
    problems.sort(key=lambda p: (p.file, p.line))
    dataset = datasets.Dataset.from_dict(columns)
    stats.seconds = time.perf_counter() - start
    return PreparedPreferences(dataset, stats, problems, loaded.formats, unpaired, len(dataset))


def _units(ex: PreferenceExample, unpaired: bool) -> list[tuple[list[Message], bool | None]]:
    """What is encoded for one record: the pair; for KTO its labelled reply, or each reply of a pair labelled."""
    if not unpaired:
        return [([ex.chosen, ex.rejected], None)]
    if ex.paired:
        return [([ex.chosen], True), ([ex.rejected], False)]
    return [([ex.chosen], ex.label)]


def _add(columns: dict[str, list], enc: Encoded, unpaired: bool, name: str, line: int) -> None:
    columns["prompt_ids"].append(enc.prompt_ids)
    if unpaired:
        columns["completion_ids"].append(enc.chosen_ids)
        columns["label"].append(enc.label)
    else:
        columns["chosen_ids"].append(enc.chosen_ids)
        columns["rejected_ids"].append(enc.rejected_ids)
    columns["file"].append(name)
    columns["record"].append(line)


def report_lines(prepared: PreparedPreferences, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The Sanity Check of each reply of the first example (prompt untrained, reply and its closing token
    trained), the statistics, then every invalid record as FILE:LINE: field: what."""
    lines: list[str] = []
    if len(prepared.dataset):
        first = prepared.dataset[0]
        if prepared.unpaired:
            replies = [(f"the reply (label {str(first['label']).lower()})", first["completion_ids"])]
        else:
            replies = [("chosen", first["chosen_ids"]), ("rejected", first["rejected_ids"])]
        prompt = first["prompt_ids"]
        for title, ids in replies:
            lines.append(f"{title}:")
            lines += sanity_check_lines(prompt + ids, [IGNORE_INDEX] * len(prompt) + ids, tokenizer)
    what = "labelled replies (KTO)" if prepared.unpaired else "pairs (a chosen and a rejected sequence each)"
    lines.append(f"{what}: {prepared.pairs}")
    lines += prepared.stats.lines()
    if prepared.problems:
        lines.append(f"{len(prepared.problems)} invalid record(s):")
        lines += [str(p) for p in prepared.problems]
    return lines


def write_dump(prepared: PreparedPreferences, path: str) -> None:
    """One JSON object per kept example: file, record and its columns of ids (and KTO's label)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in prepared.dataset:
            f.write(json.dumps(row) + "\n")


def check_target_length(max_target_length: int | None) -> None:
    if max_target_length is not None:
        raise ValueError(
            "--max_target_length does not apply to preference data: a reply is never cut (its closing token is "
            "what the model must learn); a pair that does not fit --max_seq_length is skipped and counted"
        )
