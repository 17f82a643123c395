"""Labels for one example's text (encode_piece): characters mapped to tokens by their offsets, the trained turns'
tokens trained with exactly one closing token each (the end-of-turn rule); input-output data's prompt and response
(encode_raw); truncation that drops whole later turns first.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from chatft.data.history import Piece, _special_ids
from chatft.data.rendering import TemplateError
from chatft.data.schema import Conversation

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]  # token index just past each trained assistant turn (where a truncation may cut)
    cut: bool = False  # input-output: the prompt or response was cut to max_source/target_length
    closers: list[int] = field(default_factory=list)  # the closing token trained at the end of each turn
    turns: list[int] = field(default_factory=list)  # which trained turns of the conversation (1 = its first)


def _token_range(offsets: list[tuple[int, int]], span: tuple[int, int]) -> tuple[int, int]:
    """[first, stop) of the tokens holding any character of span (offsets are sorted, as tokens are in order; a
    zero-width token counts for the character at its start)."""
    first = bisect.bisect_right(offsets, span[0], key=_end)
    stop = bisect.bisect_left(offsets, span[1], key=_start)
    return first, max(first, stop)


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _end(offset: tuple[int, int]) -> int:
    return max(offset[1], offset[0] + 1)


def _positions(ids: list[int], wanted: set[int]) -> list[int]:
    """The indices k with ids[k] in wanted, in order (found with list.index: special tokens are few in a text)."""
    found = []
    for t in wanted.intersection(ids):
        k = ids.index(t)
        while True:
            found.append(k)
            try:
                k = ids.index(t, k + 1)
            except ValueError:
                break
    return sorted(found)


def encode_piece(piece: Piece, tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """Labels by the end-of-turn rule: every trained assistant turn trains its text after the generation prompt
    and exactly one closing token, which is
    - the last special token of the turn's own text (ChatML's <|im_end|>, Llama-3's <|eot_id|>, Gemma's
      <end_of_turn>, Mistral's </s>, Phi-3's <|end|>); what follows it (a newline) is not trained;
    - else the special token that follows the turn, after white space only (GLM and ChatGLM3: the next role's
      token, <|user|> or <|observation|>), the white space trained with it;
    - else, at the very end of the text, an appended EOS.
    Anything else (the turn's text followed by ordinary text, or holding the closer before its end) is refused
    with the reason: the model would not learn where its turn ends."""
    text = piece.text
    ids, offsets = token_offsets(tokenizer, text)
    labels = [IGNORE_INDEX] * len(ids)
    specials = _special_ids(tokenizer)
    eos = tokenizer.eos_token_id
    # where the special tokens and the EOS are: a turn's own closer and an early end of turn are looked up there
    marked = _positions(ids, specials | {eos})
    turn_ends, closers = [], []
    for n, span in zip(piece.turns, piece.spans, strict=True):
        first, stop = _token_range(offsets, span)
        while first < stop and ids[first] in specials and offsets[first][0] < span[0]:
            first += 1  # a header token that swallows the white space after it (rstrip, as Phi-3's) stays untrained
        inside = marked[bisect.bisect_left(marked, first) : bisect.bisect_left(marked, stop)]
        own = [k for k in inside if ids[k] in specials]
        if own:
            stop = own[-1] + 1
        else:
            while (
                stop < len(ids) and ids[stop] not in specials and not _token_text(text, offsets[stop]).strip()
            ):
                stop += 1  # white space between the turn and what closes it
            if stop < len(ids) and ids[stop] in specials:
                stop += 1
            elif stop == len(ids):
                ids.append(_eos_id(tokenizer))
                labels.append(IGNORE_INDEX)
                stop += 1
            else:
                raise TemplateError(
                    f"assistant turn {n} has no closing token: the template ends it with neither a special token "
                    f"of its own nor a special token after it (it is followed by {_token_text(text, offsets[stop])!r}), "
                    "so the model could not learn where its turn ends; use a template that closes turns with a "
                    "special token"
                )
        closer = ids[stop - 1]  # a special token, or the EOS: in `marked` wherever else it stands
        inside = marked[bisect.bisect_left(marked, first) : bisect.bisect_left(marked, stop - 1)]
        early = [k for k in inside if ids[k] in (closer, eos)]
        if early:
            raise TemplateError(
                f"assistant turn {n} holds its end-of-turn token {tokenizer.convert_ids_to_tokens(ids[early[0]])!r} "
                "inside its text: the model would learn to end the turn there; remove it from the data"
            )
        labels[first:stop] = ids[first:stop]
        turn_ends.append(stop)
        closers.append(closer)
    return Encoded(ids, labels, turn_ends, closers=closers, turns=list(piece.turns))


def _token_text(text: str, offset: tuple[int, int]) -> str:
    return text[offset[0] : _end(offset)]


def token_offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids and character offsets of text, no special tokens added: what tokenizer(text,
    add_special_tokens=False, return_offsets_mapping=True) gives, taken from the Rust tokenizer directly where
    that is the same (_direct: the Python wrapper costs more than the tokenizing, on a chat turn)."""
    backend = _direct(tokenizer)
    if backend is None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])
    enc = backend.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets


def _direct(tokenizer: PreTrainedTokenizerBase):
    """The Rust tokenizer, when calling it gives what the tokenizer's __call__ gives: transformers' own fast
    tokenizer call (not a subclass's), no truncation or padding set on the Rust tokenizer (the call turns them
    off), special tokens split as the call splits them. Else None."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(tokenizer, "_tokenizer", None)
    kind = type(tokenizer)
    if (
        backend is None
        or not isinstance(tokenizer, TokenizersBackend)
        or kind._encode_plus is not TokenizersBackend._encode_plus
        or kind.__call__ is not PreTrainedTokenizerBase.__call__
        or backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return None
    return backend


def encode_raw(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> Encoded:
    """input-output data: the prompt (with the tokenizer's own prefix tokens, e.g. BOS) untrained, then the
    response and EOS trained. Prompt and response are tokenized apart, as at inference the prompt is encoded
    alone and the model continues it. A response cut by max_target_length gets no EOS: it did not end there, and
    an EOS would teach the model to stop mid-answer."""
    prompt, response = conv.messages[0].content, conv.messages[1].content
    a = with_prefix_tokens(tokenizer, prompt)
    b = tokenizer(response, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]
    n_a, n_b = len(a), len(b)
    if max_source_length is not None:
        a = a[:max_source_length]
    if max_target_length is not None:
        b = b[:max_target_length]
    cut = len(a) < n_a or len(b) < n_b
    closers = [] if len(b) < n_b else [b[-1]]
    return Encoded(a + b, [IGNORE_INDEX] * len(a) + b, [len(a) + len(b)], cut, closers)


def with_prefix_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """text's ids with the special tokens the tokenizer puts before it, and none it would put after (an EOS
    after the prompt would tell the model the conversation is over)."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[: i + len(plain)]
    return plain


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise TemplateError("the tokenizer has no EOS token to end a trained turn with")
    return tokenizer.eos_token_id


def truncate(enc: Encoded, max_length: int) -> tuple[Encoded, bool]:
    """Cut to max_length tokens: drop whole later turns first (cut just after the last trained turn that fits);
    cut inside a turn only when not even the first one fits. Returns (example, whether anything was cut, here or
    by max_source/target_length)."""
    if len(enc.input_ids) <= max_length:
        return enc, enc.cut
    kept = [k for k, e in enumerate(enc.turn_ends) if e <= max_length]
    cut = enc.turn_ends[kept[-1]] if kept else max_length
    turn_ends = [enc.turn_ends[k] for k in kept]
    closers = [enc.closers[k] for k in kept]
    turns = [enc.turns[k] for k in kept if k < len(enc.turns)]
    return Encoded(enc.input_ids[:cut], enc.labels[:cut], turn_ends, True, closers, turns), True
