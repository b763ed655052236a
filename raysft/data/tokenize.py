"""Chat template, tokenization and label masks.

Assistant turns are located by rendering growing prefixes of the conversation with the model's own
template, so masking works for any template: no ``{% generation %}`` markers are needed. A token is
trained when it starts inside an assistant turn; the end-of-turn token is part of the turn, and EOS
is always trained so the model learns to stop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from raysft.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a token that is not trained (the value torch's cross-entropy ignores)."""

# Raw string: Jinja itself must see the '\n' escapes, as in the templates shipped with models.
CHATML_TEMPLATE = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> None:
    """Give `tokenizer` a chat template: a Jinja string always wins; ``"chatml"`` or None only fill a gap.

    Example:
        >>> ensure_chat_template(tokenizer, "chatml")  # doctest: +SKIP
    """
    if template is not None and template != "chatml":
        tokenizer.chat_template = template
        return
    if tokenizer.chat_template:
        return
    if template is None:
        logger.warning(
            "The tokenizer %s has no chat template; using ChatML. Set model.chat_template to choose another.",
            tokenizer.name_or_path or type(tokenizer).__name__,
        )
    tokenizer.chat_template = CHATML_TEMPLATE


def tokenize_example(
    example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
) -> dict[str, Any]:
    """Tokenize one normalized row into ``input_ids`` and ``labels`` (IGNORE_INDEX where not trained).

    Example:
        >>> row = {"messages": None, "text": "Hello", "origin": "rows[0]"}
        >>> tokenize_example(row, tokenizer, train_on_inputs=False)["labels"]  # doctest: +SKIP
        [...]  # every token, EOS included
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path} has no eos_token; set one so that examples can end")
    if example["messages"] is None:
        input_ids = list(tokenizer(example["text"], add_special_tokens=True)["input_ids"])
        if not input_ids or input_ids[-1] != eos_id:
            input_ids.append(eos_id)
        return {"input_ids": input_ids, "labels": list(input_ids), "origin": example["origin"]}

    full, spans = assistant_spans(example["messages"], tokenizer, example["origin"])
    # The last turn's span reaches the end of the rendering (bar whitespace after its end-of-turn
    # marker), so EOS is trained already when the template emits it. Otherwise EOS is appended, and
    # the last turn is trained through to it so that nothing untrained sits between the two.
    append_eos = bool(spans) and tokenizer.eos_token not in full[spans[-1][0] : spans[-1][1]]
    if append_eos:
        spans[-1] = (spans[-1][0], len(full))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = _mask_outside(input_ids, encoded["offset_mapping"], spans)
    if append_eos:
        input_ids.append(eos_id)
        labels.append(eos_id)
    if train_on_inputs:
        labels = list(input_ids)
    return {"input_ids": input_ids, "labels": labels, "origin": example["origin"]}


def assistant_spans(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, origin: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character span of every assistant turn.

    Turn i's span runs from the end of the prefix rendered with a generation prompt to the end of the
    prefix that includes turn i, so the template's own header is excluded and its end-of-turn
    marker included.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    markers = _end_of_turn_markers(tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(
                f"{origin}: the chat template does not render prefixes consistently (at turn {index}): "
                "rendering the conversation up to a turn must give the start of the full rendering. "
                "templates that rewrite earlier turns (e.g. drop past reasoning) can't be masked per turn; "
                "set model.chat_template to one that renders each turn the same way every time"
            )
        spans.append((len(before), _end_after_marker(full, len(before), len(through), markers)))
    return full, spans


def count_trained(labels: list[int]) -> int:
    """Tokens that contribute to the loss. Position 0 never does: no token precedes it to predict it."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


class TokenizeBatch:
    """Ray Data callable class: normalized rows in, token ids and labels out.

    The tokenizer travels to the actors pickled in the constructor arguments, so actors on any node
    of a cluster get the exact tokenizer (chat template included) without reading a local folder.

    Example:
        >>> ds.map_batches(TokenizeBatch, fn_constructor_args=(tokenizer, False),
        ...                compute=ray.data.ActorPoolStrategy(size=2), batch_format="numpy")  # doctest: +SKIP
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool):
        self.tokenizer = tokenizer
        self.train_on_inputs = train_on_inputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "origin": [], "num_tokens": [], "num_trained": []}
        for messages, text, origin in zip(batch["messages"], batch["text"], batch["origin"], strict=True):
            example = {"messages": _as_messages(messages), "text": text, "origin": str(origin)}
            tokenized = tokenize_example(example, self.tokenizer, self.train_on_inputs)
            out["input_ids"].append(tokenized["input_ids"])
            out["labels"].append(tokenized["labels"])
            out["origin"].append(tokenized["origin"])
            out["num_tokens"].append(len(tokenized["input_ids"]))
            out["num_trained"].append(count_trained(tokenized["labels"]))
        return out


def _as_messages(messages: Any) -> list[dict[str, str]] | None:
    # Ray Data hands a list<struct> cell over as an object ndarray of dicts, and a text row's empty
    # cell as None, or as NaN when every row of the block is a text row (an all-null column becomes
    # float32). Rebuild plain dicts so templates see exactly role and content.
    if messages is None or isinstance(messages, (float, np.floating)):
        return None
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(rendered, str)  # tokenize=False always renders text
    return rendered


def _end_of_turn_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    if tokenizer.eos_token:
        special.add(tokenizer.eos_token)
    return tuple(sorted(special))


def _end_after_marker(full: str, start: int, end: int, markers: tuple[str, ...]) -> int:
    # Whitespace a template adds after the end-of-turn token is layout the model never generates
    # (generation stops at that token), so the turn ends at the marker.
    stripped = full[start:end].rstrip()
    return start + len(stripped) if stripped.endswith(markers) else end


def _mask_outside(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels equal to the ids for tokens starting inside a span, IGNORE_INDEX elsewhere."""
    labels = []
    span_index = 0
    for token_id, (start, _) in zip(input_ids, offsets, strict=True):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= start
        labels.append(token_id if inside else IGNORE_INDEX)
    return labels
