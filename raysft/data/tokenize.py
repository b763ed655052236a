"""Chat template, tokenization and label masks.

Assistant turns are located where rendering growing prefixes of the conversation with the model's own
template puts them, so masking works for any template: no ``{% generation %}`` markers are needed. A conversation
of many turns takes them from one rendering that records what the template reads (time linear in its length),
where that rendering proves the prefixes would give the same; otherwise the prefixes are rendered. A token is
trained when it starts inside an assistant turn; the end-of-turn token is part of the turn, and EOS
is always trained so the model learns to stop.

Tool calls and reasoning are part of the assistant turn (whatever the template writes between the turn's
header and its end-of-turn marker is trained); tool results are turns of their own role and never trained.
A template that leaves out part of a conversation (tool calls, tool results, reasoning, the tool schemas)
would train on something other than the data, so that is an error naming the row, as is a template that
refuses the conversation (``raise_exception``).

Only the template's own markers are control tokens: a special token spelled inside message content,
reasoning, tool calls or tool schemas (a user typing ``<|im_end|>``) is tokenized as plain text unless
``parse_special_tokens`` is set, so data cannot forge turn boundaries.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.runtime import LoopContext
import numpy as np
import pyarrow as pa
from transformers.utils.chat_template_utils import (
    _alias_reasoning_fields,
    _compile_jinja_template,
    _normalize_chat_messages,
    _plain_template_data,
)

from raysft.config import SourceConfig
from raysft.data.cache import source_of
from raysft.data.formats import normalize_row, strings_in, tool_name
from raysft.labels import IGNORE_INDEX
from raysft.errors import DataError
from raysft.chat_template import chat_template_fault

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize_example(
    example: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    train_on_inputs: bool,
    parse_special_tokens: bool = False,
) -> dict[str, Any]:
    """Tokenize one normalized row into ``input_ids`` and ``labels`` (IGNORE_INDEX where not trained).

    With `parse_special_tokens` false, special-token spellings inside the content are plain text. Many rows:
    :func:`tokenize_examples` (one tokenizer call for all of them).

    Example:
        >>> row = {"messages": None, "text": "Hello", "origin": "rows[0]"}
        >>> tokenize_example(row, tokenizer, train_on_inputs=False)["labels"]  # doctest: +SKIP
        [...]  # every token, EOS included
    """
    rendered = render_example(example, tokenizer, parse_special_tokens)
    input_ids, labels = tokenize_examples([rendered], tokenizer, train_on_inputs)[0]
    return {"input_ids": input_ids.tolist(), "labels": labels.tolist(), "origin": example["origin"]}


@dataclass
class RenderedExample:
    """A row as text ready to encode: what is trained (character spans) and how the text must be encoded."""

    text: str
    spans: list[tuple[int, int]] | None  # None: a text row, every token trained
    forged: list[tuple[int, int]]  # spellings of special tokens in the data, to encode as plain text
    append_eos: bool
    split_special_tokens: bool = False  # a text row that spells a special token: encoded all as plain text


def render_example(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                   parse_special_tokens: bool = False) -> RenderedExample:
    """Render one normalized row with the chat template and find what is trained in it (DataError on a bad row)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path} has no eos_token; set one so that examples can end")
    if example["messages"] is None:
        # All of a text row is content. Asking for plain text only where a special token is spelled
        # leaves every other row's encoding exactly as it always was.
        spelled = not parse_special_tokens and _special_pattern(tokenizer).search(example["text"]) is not None
        return RenderedExample(example["text"], None, [], True, split_special_tokens=spelled)
    messages, tools, origin = example["messages"], example.get("tools"), example["origin"]
    full, spans = assistant_spans(messages, tokenizer, origin, tools)
    forged = [] if parse_special_tokens else _forged_spans(full, messages, tools, tokenizer, origin)
    # The last turn's span reaches the end of the rendering (bar whitespace after its end-of-turn
    # marker), so EOS is trained already when the template emits it. Otherwise EOS is appended, and
    # the last turn is trained through to it so that nothing untrained sits between the two.
    unforged = _blank_out(full, forged)  # a spelled EOS in content is text, not the end of the turn
    append_eos = bool(spans) and tokenizer.eos_token not in unforged[spans[-1][0] : spans[-1][1]]
    if append_eos:
        spans[-1] = (spans[-1][0], len(full))
    return RenderedExample(full, spans, forged, append_eos)


def tokenize_examples(
    rendered: list[RenderedExample], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) as int32 arrays for each rendered row, with one tokenizer call per kind of row (a fast
    tokenizer encodes a batch in Rust)."""
    eos_id = tokenizer.eos_token_id
    out: list[tuple[np.ndarray, np.ndarray]] = [(_NO_TOKENS, _NO_TOKENS)] * len(rendered)
    kinds: dict[tuple[bool, bool], list[int]] = {}
    for index, row in enumerate(rendered):
        kinds.setdefault((row.spans is None, row.split_special_tokens), []).append(index)
    for (text_rows, split), indices in kinds.items():
        encoded = _encode([rendered[i].text for i in indices], tokenizer, text_rows, split, offsets=not text_rows)
        for index, (input_ids, offsets) in zip(indices, encoded, strict=True):
            row = rendered[index]
            if text_rows:
                ids = input_ids if len(input_ids) and input_ids[-1] == eos_id else np.append(input_ids, eos_id)
                out[index] = (ids.astype(np.int32, copy=False), ids.astype(np.int32, copy=False))
                continue
            if row.forged:
                input_ids, offsets = _as_plain_text(row.text, input_ids, offsets, row.forged, tokenizer)
            assert row.spans is not None and offsets is not None  # a chat row
            ids = np.append(input_ids, [eos_id] * row.append_eos).astype(np.int32, copy=False)
            if train_on_inputs:
                labels = ids
            else:  # an appended EOS is trained: the model learns to stop
                labels = np.append(_mask_outside(ids[: len(input_ids)], offsets[:, 0], row.spans),
                                   ids[len(input_ids) :])
            out[index] = (ids, labels.astype(np.int32, copy=False))
    return out


def _encode(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool, split_special_tokens: bool,
    offsets: bool,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(token ids, character offsets as an (n, 2) array, None without `offsets`) of every text, encoded in one
    call: what ``tokenizer(texts, add_special_tokens=..., split_special_tokens=..., return_offsets_mapping=...)``
    gives.

    A fast tokenizer is called through its Rust backend, its encodings read straight into arrays: transformers'
    conversion of each encoding to Python lists (ids, attention mask, offsets) was a tenth of the tokenize time.
    """
    backend = _plain_backend(tokenizer)
    if backend is None:
        options = {"split_special_tokens": True} if split_special_tokens else {}
        encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets, **options)
        return [(np.asarray(ids, np.int64),
                 np.asarray(encoded["offset_mapping"][i], np.int64).reshape(-1, 2) if offsets else None)
                for i, ids in enumerate(encoded["input_ids"])]
    # What tokenizer(...) sets up before it calls the backend: no truncation, no padding, special tokens as asked.
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = split_special_tokens
    try:
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
    finally:
        backend.encode_special_tokens = tokenizer.split_special_tokens
    return [(np.fromiter(encoding.ids, np.int64, len(encoding)),
             np.fromiter(itertools.chain.from_iterable(encoding.offsets), np.int64, 2 * len(encoding)).reshape(-1, 2)
             if offsets else None)
            for encoding in encodings]


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer behind `tokenizer` where calling `tokenizer` is calling it (transformers' TokenizersBackend,
    whose encoding steps the model's own class leaves as they are: Code Llama's, for one, rewrites the text first);
    else None."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not isinstance(tokenizer, TokenizersBackend):
        return None
    steps = ("__call__", "_encode_plus", "_switch_to_input_mode")
    if any(getattr(type(tokenizer), step, None) is not getattr(TokenizersBackend, step, None) for step in steps):
        return None
    return tokenizer.backend_tokenizer


_NO_TOKENS = np.zeros(0, np.int32)


def assistant_spans(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    origin: str,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation (with its `tools`); return the text and the character span of every assistant turn.

    The spans are :func:`prefix_assistant_spans`'s, by definition, taken from one rendering that logs what the
    template reads (:func:`_spans_from_log`, time linear in the conversation's length) where that log proves
    them the same; otherwise the prefixes are rendered.
    """
    logged = _logged_render(tokenizer, messages, tools, False)
    full = logged[0] if logged is not None else _render(tokenizer, messages, tools, False, origin)
    _check_rendered(tokenizer, full, messages, tools, origin)
    spans = _spans_from_log(full, logged[1], messages, tokenizer, tools) if logged is not None else None
    return full, spans if spans is not None else _prefix_spans(full, messages, tokenizer, origin, tools)


def prefix_assistant_spans(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    origin: str,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The reference masks: :func:`assistant_spans` by rendering growing prefixes, for every row.

    Turn i's span runs from the end of the prefix rendered with a generation prompt to the end of the
    prefix that includes turn i, so the template's own header is excluded and its end-of-turn
    marker included: reasoning and tool calls rendered inside the turn are in the span, tool results
    (turns of their own) are not. Two renderings of up to the whole conversation per assistant turn: time
    quadratic in the number of turns.
    """
    full = _render(tokenizer, messages, tools, False, origin)
    _check_rendered(tokenizer, full, messages, tools, origin)
    return full, _prefix_spans(full, messages, tokenizer, origin, tools)


def _prefix_spans(
    full: str,
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    origin: str,
    tools: list[dict[str, Any]] | None,
) -> list[tuple[int, int]]:
    markers = _end_of_turn_markers(tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], tools, True, origin)
        # The last turn's prefix is the whole conversation: rendered once already (a third of the cost of a
        # one-turn row).
        last = index + 1 == len(messages)
        through = full if last else _render(tokenizer, messages[: index + 1], tools, False, origin)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(
                f"{origin}: the chat template does not render prefixes consistently (at turn {index}): "
                "rendering the conversation up to a turn must give the start of the full rendering. "
                "templates that rewrite earlier turns (e.g. drop past reasoning) can't be masked per turn; "
                "set model.chat_template to one that renders each turn the same way every time"
            )
        spans.append((len(before), _end_after_marker(full, len(before), len(through), markers)))
    return spans


# Jinja's objects whose state a loop can change and the text after the loop can read (cycler and joiner advance,
# namespace attributes are set): a template using one may write a generation prompt that depends on the turns.
_STATEFUL_TEMPLATE = re.compile(r"\b(namespace|cycler|joiner)\b")


class _ReadLog:
    """What a template has read of the conversation while rendering it, and how much text it had written by then.

    Each read is logged with the fewest leading messages a prefix needs for that read to give the same answer
    as on the whole conversation (reading message j needs j + 1; its length needs all of them), and, for a
    ``{% for %}`` loop moving on to its next message (not looking ahead for ``loop.last``), that message's index.
    """

    def __init__(self, messages: list[dict[str, Any]]):
        self.messages = messages
        self.written = 0
        self.reads: list[tuple[int, int, int]] = []  # (characters written, messages needed, index the loop moved to)

    def note(self, needed: int, moved_to: int = -1) -> None:
        self.reads.append((self.written, needed, moved_to))


class _LoggedTurns(Sequence):  # type: ignore[type-arg]
    """The messages ``[start, stop)`` as a template sees them, every read logged in a :class:`_ReadLog`.

    Not a list: anything that reads it (iteration, length, indexing, slicing, filters, ``tojson``) goes through
    these methods or fails, so no read escapes the log.
    """

    def __init__(self, log: _ReadLog, start: int, stop: int):
        self._log, self._start, self._stop = log, start, stop

    def __len__(self) -> int:
        self._log.note(self._stop)
        return self._stop - self._start

    def __bool__(self) -> bool:
        if self._stop > self._start:
            self._log.note(self._start + 1)
        return self._stop > self._start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(self._start, self._stop + 1):
            self._log.note(min(index + 1, self._stop), index if _loop_steps(sys._getframe(1)) else -1)
            if index == self._stop:
                return  # the end: where a prefix's rendering parts from the whole one
            yield self._log.messages[index]

    def __reversed__(self) -> Iterator[dict[str, Any]]:
        self._log.note(self._stop)
        return reversed(self._log.messages[self._start : self._stop])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            if key.step not in (None, 1) or any(bound is not None and bound < 0 for bound in (key.start, key.stop)):
                self._log.note(self._stop)  # counted from the end, or every other message: depends on all
                return self._log.messages[self._start : self._stop][key]
            start = min(self._start + (key.start or 0), self._stop)
            stop = self._stop if key.stop is None else min(self._start + key.stop, self._stop)
            return _LoggedTurns(self._log, start, max(start, stop))
        if not isinstance(key, int):
            raise TypeError(f"messages are indexed by numbers, not {type(key).__name__}")
        if key < 0:
            self._log.note(self._stop)
            key += self._stop - self._start
            if key < 0:
                raise IndexError("message index out of range")
        index = self._start + key
        if index >= self._stop:
            raise IndexError("message index out of range")  # out of range for every prefix as well
        self._log.note(index + 1)
        return self._log.messages[index]

    def __repr__(self) -> str:
        self._log.note(self._stop)
        return repr(self._log.messages[self._start : self._stop])


def _loop_steps(caller: FrameType) -> bool:
    """Whether the code asking a :class:`_LoggedTurns` for its next message is a ``{% for %}`` loop stepping to its
    next iteration (not ``loop.last`` or ``loop.nextitem`` looking ahead, not a filter or a test reading it all).

    A loop that uses ``loop`` steps through Jinja's LoopContext; one that does not is a plain Python ``for`` in the
    template's compiled code, reading through a generator of that code where the loop has an ``if`` filter.
    """
    if caller.f_code.co_filename == "<template>":  # compiled template code (transformers compiles from a string)
        return caller.f_back is None or caller.f_back.f_code is not LoopContext._peek_next.__code__
    return caller.f_code is LoopContext.__next__.__code__


def _logged_render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
) -> tuple[str, _ReadLog] | None:
    """What :func:`_render` renders (``apply_chat_template``'s steps: the same template, inputs and arguments), with
    the template's reads of `messages` logged; None where the template fails (:func:`_render` then says why) or
    does with the messages what only a list allows."""
    try:
        chat = _alias_reasoning_fields(_plain_template_data(_normalize_chat_messages(messages)))
        log = _ReadLog(chat)
        compiled = _compile_jinja_template(tokenizer.get_chat_template(None, tools))
        arguments = _plain_template_data(dict(tokenizer.special_tokens_map))
        pieces = []
        for piece in compiled.generate(messages=_LoggedTurns(log, 0, len(chat)), tools=_plain_template_data(tools),
                                       documents=None, add_generation_prompt=add_generation_prompt, **arguments):
            pieces.append(piece)
            log.written += len(piece)
    except Exception:  # noqa: BLE001 (a template error, or a use of the logged messages that a list allows)
        return None
    return "".join(pieces), log


# What templates write after their loop, by (template, tools, special tokens, generation prompt): the same for every
# row whose template reads nothing of the conversation before the loop (see _spans_from_log). Rows with tools of
# their own add an entry each, so it is emptied when full.
_TAILS: dict[tuple[str, str, str, bool], str | None] = {}
_TAILS_KEPT = 256


def _spans_from_log(
    full: str,
    log: _ReadLog,
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    tools: list[dict[str, Any]] | None,
) -> list[tuple[int, int]] | None:
    """:func:`prefix_assistant_spans`'s spans from the logged rendering of the whole conversation (`full`, `log`), or
    None where the log cannot show they are the same (the caller then renders the prefixes).

    A template is a program whose only view of the messages is a :class:`_LoggedTurns`, so a prefix of k messages
    renders the same text as the whole conversation up to the first read that tells the two apart. Where that read
    is the template's loop stepping to message k, the prefix's rendering goes on with what the template writes once
    that loop has ended (the generation prompt, or closing text). That tail is the same for every k when it reads no
    message and the template keeps no state a loop can change (no namespace, cycler or joiner: Jinja scopes every
    other variable set in a loop to the loop): it is taken from the first assistant turn's prefixes, rendered whole,
    which must read nothing after their loop ends; and, where the template read nothing before its loop, it is the
    same for every row (kept in _TAILS). Each turn's span then follows, with the prefix method's own check that every
    prefix is the start of the whole rendering. Time linear in the conversation's length.
    """
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if not turns:
        return []
    count, first = len(messages), turns[0]
    template = tokenizer.get_chat_template(None, tools)
    if first == 0 or _STATEFUL_TEMPLATE.search(template):
        return None
    after_generation_prompt = _tail(tokenizer, template, messages[:first], tools, True, log)
    after_turn = _tail(tokenizer, template, messages[: first + 1], tools, False, log) if first + 1 < count else ""
    if after_generation_prompt is None or after_turn is None:
        return None
    # parted[k]: the characters a k-message prefix shares with `full`, where the loop's step to message k parts
    # them; None where something else tells them apart first.
    parted: list[int | None] = [None] * count
    covered = 0
    for written, needed, moved_to in log.reads:
        while covered < min(needed, count):
            parted[covered] = written if moved_to == covered else None
            covered += 1
    markers = _end_of_turn_markers(tokenizer)
    spans = []
    for index in turns:
        before = parted[index]
        through = len(full) if index + 1 == count else parted[index + 1]
        if before is None or through is None or not full.startswith(after_generation_prompt, before):
            return None
        before += len(after_generation_prompt)
        if index + 1 < count:
            if not full.startswith(after_turn, through):
                return None
            through += len(after_turn)
        if before > through:
            return None
        spans.append((before, _end_after_marker(full, before, through, markers)))
    return spans


def _tail(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    prefix: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    log: _ReadLog,
) -> str | None:
    """:func:`_tail_after_loop`, from _TAILS where the row's `log` shows the template read nothing before its loop."""
    if not log.reads or log.reads[0][2] != 0:
        return _tail_after_loop(tokenizer, prefix, tools, add_generation_prompt)
    key = (template, json.dumps(tools, sort_keys=True, default=str), str(tokenizer.special_tokens_map),
           add_generation_prompt)
    if key not in _TAILS:
        if len(_TAILS) >= _TAILS_KEPT:
            _TAILS.clear()
        _TAILS[key] = _tail_after_loop(tokenizer, prefix, tools, add_generation_prompt, nothing_read_before=True)
    return _TAILS[key]


def _tail_after_loop(
    tokenizer: PreTrainedTokenizerBase,
    prefix: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    nothing_read_before: bool = False,
) -> str | None:
    """What the template writes after its loop over `prefix` ends, or None where that text reads a message (or the
    loop did not end by stepping past the last one, or, with `nothing_read_before`, the template read a message
    before its loop)."""
    logged = _logged_render(tokenizer, prefix, tools, add_generation_prompt)
    if logged is None:
        return None
    text, log = logged
    ends = [position for position, (_, _, moved_to) in enumerate(log.reads) if moved_to == len(prefix)]
    if len(ends) != 1 or ends[0] + 1 != len(log.reads) or (nothing_read_before and log.reads[0][2] != 0):
        return None
    return text[log.reads[ends[0]][0] :]


class TokenizeRows:
    """Ray Data callable class: raw rows (raysft/data/read.py) in; normalized, tokenized and masked out.

    The tokenizer and the sources' settings travel to the actors pickled in the constructor arguments, so
    actors on any node of a cluster get the exact tokenizer (chat template included) without reading a
    local folder.

    A row that cannot be used (bad shape, too long, untokenizable) comes out with empty ids and its message
    in the ``error`` column, ``skippable`` when its source says ``invalid_rows: skip``; a read problem (a
    row whose ``error`` is set already) passes through and is never skippable. So the driver reports every
    problem by its origin instead of the whole Ray job failing on the first one.

    Example:
        >>> ds.map_batches(TokenizeRows, fn_constructor_args=(tokenizer, sources, formats, data_cfg),
        ...                compute=ray.data.ActorPoolStrategy(size=2), batch_format="pyarrow")  # doctest: +SKIP
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sources: list[SourceConfig], formats: list[str],
                 train_on_inputs: bool, parse_special_tokens: bool, max_row_chars: int):
        # One thread per actor: each actor holds one CPU, and the fast tokenizer's own thread pool (one thread per
        # core) made two actors on two cores fight (in process under load: 1.3-3.7 ms a row against 0.8-0.85).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = tokenizer
        self.sources, self.formats = sources, formats
        self.train_on_inputs, self.parse_special_tokens = train_on_inputs, parse_special_tokens
        self.max_row_chars = max_row_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        sources = source_of(batch.column("seq").to_numpy()).tolist()
        rendered: list[RenderedExample] = []
        kept: list[int] = []  # the rows rendered; the others carry their error
        errors: list[str | None] = [None] * batch.num_rows
        skippable = np.zeros(batch.num_rows, dtype=bool)
        for index, (origin, raw, read_error) in enumerate(zip(
            batch.column("origin").to_pylist(), batch.column("row").to_pylist(), batch.column("error").to_pylist(),
            strict=True,
        )):
            source = self.sources[sources[index]]
            try:
                if read_error is not None:
                    raise DataError(read_error)
                example = normalize_row(json.loads(raw), self.formats[sources[index]], source, origin, self.max_row_chars)
                rendered.append(render_example(example, self.tokenizer, self.parse_special_tokens))
                kept.append(index)
            except DataError as err:
                errors[index] = str(err)
                skippable[index] = read_error is None and source.invalid_rows == "skip"
        ids: list[np.ndarray] = [_NO_TOKENS] * batch.num_rows
        labels: list[np.ndarray] = [_NO_TOKENS] * batch.num_rows
        for index, (row_ids, row_labels) in zip(kept, tokenize_examples(rendered, self.tokenizer, self.train_on_inputs),
                                                strict=True):
            ids[index], labels[index] = row_ids, row_labels
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        flat_labels = np.concatenate(labels) if labels else _NO_TOKENS
        # count_trained of every row at once: labels not IGNORE_INDEX, a row's first token never a target.
        trained = flat_labels != IGNORE_INDEX
        trained[offsets[:-1][lengths > 0]] = False
        trained_so_far = np.concatenate([[0], np.cumsum(trained)])
        arrow_offsets = pa.array(offsets.astype(np.int32))
        return pa.table({
            "seq": batch.column("seq"),
            "origin": batch.column("origin"),
            "input_ids": pa.ListArray.from_arrays(arrow_offsets, np.concatenate(ids) if ids else _NO_TOKENS),
            "labels": pa.ListArray.from_arrays(arrow_offsets, flat_labels),
            "num_tokens": pa.array(lengths),
            "num_trained": pa.array((trained_so_far[offsets[1:]] - trained_so_far[offsets[:-1]]).astype(np.int32)),
            "error": pa.array(errors, pa.string()),
            "skippable": pa.array(skippable),
        })


# A conversation every chat template must render: a template that fails on it is broken, whatever the data.
def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    origin: str,
) -> str:
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as err:  # raise_exception(...) in the template, a sandbox refusal, an undefined, ...
        raise DataError(f"{origin}: {chat_template_fault(err, tokenizer)}") from None
    assert isinstance(rendered, str)  # tokenize=False always renders text
    return rendered


def _check_rendered(
    tokenizer: PreTrainedTokenizerBase,
    full: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    origin: str,
) -> None:
    """Every tool result, tool call, reasoning and tool schema of the conversation is in the rendering: templates
    silently skip what they do not know, and training must not quietly drop it.

    Each part is looked for as a probe of its own (a private-use character absent from the data and the
    rendering) put in place of its text, in one more rendering, so that text repeated elsewhere (a result
    the answer quotes) cannot pass for the part. Conversations without such parts cost nothing.
    """
    parts: list[tuple[str, str]] = []  # (probe, what is missing when the probe is)
    free = (chr(code) for code in range(0xE000, 0xF900) if chr(code) not in full)

    def probe(missing: str) -> str:
        parts.append((next(free), missing))
        return parts[-1][0]

    probed = []
    for index, message in enumerate(messages):
        message = dict(message)
        if message["role"] == "tool":
            message["content"] = probe(f"turn {index}: the chat template does not render 'tool' turns")
        if message.get("reasoning_content", "").strip():
            message["reasoning_content"] = probe(
                f"turn {index}: the chat template does not render the assistant's reasoning (reasoning_content; "
                "some templates, Qwen3's among them, drop it from turns before the last user message: give each "
                "round a row of its own)")
        if "tool_calls" in message:
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "name": probe(
                    f"turn {index}: the chat template does not render tool_calls (the call of "
                    f"'{call['function']['name']}' is missing from the rendering)")}}
                for call in message["tool_calls"]
            ]
        probed.append(message)
    probed_tools = []
    for tool in tools or ():
        missing = f"the chat template does not render the row's tools ('{tool_name(tool)}' is missing)"
        if isinstance(tool.get("function"), dict):
            probed_tools.append({**tool, "function": {**tool["function"], "name": probe(missing)}})
        else:
            probed_tools.append({**tool, "name": probe(missing)})
    if not parts:
        return
    rendered = _render(tokenizer, probed, probed_tools or None, False, origin)
    for char, missing in parts:
        if char not in rendered:
            raise DataError(
                f"{origin}: {missing}; set model.chat_template to a template that renders it (raysft's `chatml` "
                "fallback renders tools, tool calls, tool results and reasoning)"
            )


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The added tokens marked special: the ones ``split_special_tokens=True`` encodes as plain text."""
    return tuple(sorted({token.content for token in tokenizer.added_tokens_decoder.values() if token.special}))


def _end_of_turn_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    eos = (tokenizer.eos_token,) if tokenizer.eos_token else ()
    return tuple(sorted({*_special_tokens(tokenizer), *eos}))


def _special_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str]:
    return _any_of(_special_tokens(tokenizer))


@functools.lru_cache(maxsize=16)
def _any_of(tokens: tuple[str, ...]) -> re.Pattern[str]:
    # Cached: escaping a few hundred tokens (Llama 3 reserves 256) costs more than searching a row.
    # Longest first, so a token wins over a shorter token it contains; "(?!)" never matches.
    longest_first = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


def _forged_spans(
    full: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tokenizer: PreTrainedTokenizerBase,
    origin: str,
) -> list[tuple[int, int]]:
    """The character spans of the rendering `full` where the data (content, reasoning, tool calls, tool
    schemas) spells a special token.

    The conversation is rendered again with each spelling replaced by a stand-in character of its own that
    the rendering does not otherwise hold, so the stand-ins land exactly where the data put spellings,
    never on the template's own markers, in whatever order the template writes the parts. Empty (and no
    second rendering) when nothing spells one.
    """
    pattern = _special_pattern(tokenizer)
    spelled = sorted({match.group() for text in strings_in([messages, tools]) for match in pattern.finditer(text)})
    if not spelled:
        return []
    free = (chr(code) for code in range(0xE000, 0xF900) if chr(code) not in full)  # Unicode private use
    stand_ins = {spelling: next(free) for spelling in spelled}
    spelling_of = {char: spelling for spelling, char in stand_ins.items()}

    def mark(text: str) -> str:
        return pattern.sub(lambda match: stand_ins[match.group()], text)

    marked = _render(tokenizer, _map_strings(messages, mark), _map_strings(tools, mark), False, origin)
    pieces = re.split(f"([{''.join(spelling_of)}])", marked)  # text, stand-in, text, ..., text
    spans: list[tuple[int, int]] = []
    rebuilt, position = [pieces[0]], len(pieces[0])
    for char, piece in zip(pieces[1::2], pieces[2::2]):
        spelling = spelling_of[char]
        spans.append((position, position + len(spelling)))
        rebuilt += [spelling, piece]
        position += len(spelling) + len(piece)
    if "".join(rebuilt) != full:
        raise DataError(
            f"{origin}: the data spells the special token {spelled[0]!r}, and the chat template "
            "changes it in a way that hides where it is; remove it from the data, or set "
            "data.parse_special_tokens=true to read it as the control token"
        )
    return spans


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` with `change` applied to every string value inside it (keys kept as they are)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {key: _map_strings(item, change) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(item, change) for item in value]
    return value


def _blank_out(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with every span overwritten by NULs: same length, so positions still match."""
    for start, end in spans:
        text = text[:start] + "\0" * (end - start) + text[end:]
    return text


def _as_plain_text(
    full: str,
    input_ids: np.ndarray,
    offsets: np.ndarray,
    forged: list[tuple[int, int]],
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-encode the tokens covering each forged span with special tokens read as plain text.

    Every other token stays as it was: a special token splits the text around it either way, so its
    neighbours are the same tokens whether it is parsed or not.
    """
    ids_out: list[np.ndarray] = []
    offsets_out: list[np.ndarray] = []
    index = 0
    for start, end in forged:
        kept = index
        while index < len(input_ids) and offsets[index][1] <= start:
            index += 1
        ids_out.append(input_ids[kept:index])
        offsets_out.append(offsets[kept:index])
        low, high = start, end
        while index < len(input_ids) and offsets[index][0] < end:  # the tokens overlapping the span
            low, high = min(low, int(offsets[index][0])), max(high, int(offsets[index][1]))
            index += 1
        plain = tokenizer(
            full[low:high], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True
        )
        ids_out.append(np.asarray(plain["input_ids"], np.int64))
        offsets_out.append(np.asarray(plain["offset_mapping"], np.int64).reshape(-1, 2) + low)
    ids_out.append(input_ids[index:])
    offsets_out.append(offsets[index:])
    return np.concatenate(ids_out), np.concatenate(offsets_out)


def _end_after_marker(full: str, start: int, end: int, markers: tuple[str, ...]) -> int:
    # Whitespace a template adds after the end-of-turn token is layout the model never generates
    # (generation stops at that token), so the turn ends at the marker.
    stripped = full[start:end].rstrip()
    return start + len(stripped) if stripped.endswith(markers) else end


def _mask_outside(ids: np.ndarray, starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels equal to the ids for tokens starting (first character at `starts`) inside a span, IGNORE_INDEX
    elsewhere."""
    if not spans:
        return np.full(len(ids), IGNORE_INDEX, np.int32)
    span_starts, span_ends = np.asarray(spans, dtype=np.int64).T
    # Vectorized (a Python loop here was a quarter of the tokenize time): the first span ending after each
    # token's start holds the token when it also starts at or before the token.
    candidate = np.searchsorted(span_ends, starts, side="right")
    inside = candidate < len(spans)
    inside[inside] = span_starts[candidate[inside]] <= starts[inside]
    return np.where(inside, ids, IGNORE_INDEX).astype(np.int32)
