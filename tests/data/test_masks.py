"""Assistant masks from one rendering (raysft.data.tokenize.assistant_spans) against the reference, the masks from
rendering growing prefixes (prefix_assistant_spans), on the test corpora and on templates built to trip them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from raysft.config import SourceConfig
from raysft.data.sources import load_examples
from raysft.data.tokenize import _logged_render, _spans_from_log, assistant_spans, prefix_assistant_spans
from raysft.errors import DataError
from raysft.tokenizer import CHATML_TEMPLATE, ensure_chat_template
from tests.data.conversations import tool_conversation
from tests.data.test_tokenize import (
    EOS_TEMPLATE,
    PLAIN_TEMPLATE,
    REWRITING_TEMPLATE,
    SHAREGPT_ROW,
    TOOL_TEMPLATE,
    _forged_conversation,
    _tool_conversation,
)

# Each of these renders prefixes consistently, and its text after the loop depends on the turns: through state the
# loop changes (a namespace), a read of the last message, or loop.last looking ahead mid-turn.
COUNTING_TEMPLATE = (
    r"{%- set ns = namespace(turns=0) -%}"
    r"{%- for m in messages -%}{%- set ns.turns = ns.turns + 1 -%}"
    r"{{- '<|im_start|>' + m.role + ' ' + ns.turns|string + '\n' + m.content + '<|im_end|>\n' -}}{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant ' + (ns.turns + 1)|string + '\n' -}}{%- endif -%}"
)
LAST_ROLE_TEMPLATE = (
    r"{%- for m in messages -%}{{- '<|im_start|>' + m.role -}}"
    r"{%- if loop.previtem is defined and loop.previtem.role == 'user' -%}{{- ' answering' -}}{%- endif -%}"
    r"{{- '\n' + m.content + '<|im_end|>\n' -}}{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant' -}}"
    r"{%- if messages[-1].role == 'user' -%}{{- ' answering' -}}{%- endif -%}{{- '\n' -}}{%- endif -%}"
)
LOOP_LAST_TEMPLATE = (
    r"{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' -}}"
    r"{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '\n<|im_start|>assistant\n' -}}{%- endif -%}"
)
# The system turn read by index and the rest by a slice, as Llama 3's template does.
SLICING_TEMPLATE = (
    r"{%- if messages[0].role == 'system' -%}{{- '[SYS] ' + messages[0].content + '\n' -}}"
    r"{%- set messages = messages[1:] -%}{%- endif -%}"
    r"{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


@pytest.fixture
def tokenizer(tiny_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    return copy.deepcopy(tiny_tokenizer)  # tests change its template


def _rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return load_examples([SourceConfig(rows=rows)])


def _corpus(shared_data: Path, rows_each: int | None) -> list[dict[str, Any]]:
    sources = [SourceConfig(path=str(shared_data / path), limit=rows_each, invalid_rows="skip") for path in
               ("sharegpt/identity_conversations.json", "gsm8k/train.jsonl", "code_alpaca/code_alpaca_2k.json")]
    tool_rows = [tool_conversation(length, seed) for length in (4, 7, 16, 40, 80, 200) for seed in range(3)]
    return load_examples(sources) + _rows(tool_rows)


def _one_rendering(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, full: str) -> Any:
    """The spans from one logged rendering (None where it cannot prove them), which must render `full`."""
    logged = _logged_render(tokenizer, example["messages"], example.get("tools"), False)
    assert logged is not None and logged[0] == full
    return _spans_from_log(full, logged[1], example["messages"], tokenizer, example.get("tools"))


def _assert_one_rendering_is_the_reference(examples: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> None:
    for example in examples:
        full, reference = prefix_assistant_spans(example["messages"], tokenizer, example["origin"], example.get("tools"))
        spans = _one_rendering(example, tokenizer, full)
        assert spans == reference, example["origin"]
        assert assistant_spans(example["messages"], tokenizer, example["origin"], example.get("tools")) == (
            full, reference)


def test_one_rendering_gives_the_reference_masks_on_the_corpora(
    shared_data: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    # ShareGPT whole, the first 300 rows of GSM8K and Code Alpaca, tool calls with reasoning of 4 to 200 messages.
    _assert_one_rendering_is_the_reference(_corpus(shared_data, 300), tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("template", [CHATML_TEMPLATE, EOS_TEMPLATE, SLICING_TEMPLATE], ids=["chatml", "eos", "slicing"])
def test_one_rendering_gives_the_reference_masks_on_every_corpus_row(
    shared_data: Path, tokenizer: PreTrainedTokenizerBase, template: str
) -> None:
    ensure_chat_template(tokenizer, template)
    examples = _corpus(shared_data, None)
    if template != CHATML_TEMPLATE:  # the others render no tools, reasoning or tool turns
        examples = [example for example in examples if not example.get("tools")]
    _assert_one_rendering_is_the_reference(examples, tokenizer)


def _outcome(spans_of: Any, example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Any:
    try:
        return spans_of(example["messages"], tokenizer, example["origin"], example.get("tools"))
    except DataError as err:
        return str(err)


@pytest.mark.parametrize(
    ("template", "served"),
    [(CHATML_TEMPLATE, [True] * 4), (PLAIN_TEMPLATE, [True, True]), (EOS_TEMPLATE, [True, True]),
     (SLICING_TEMPLATE, [True, True]), (TOOL_TEMPLATE, [True, True, False, False]), (REWRITING_TEMPLATE, [True]),
     (COUNTING_TEMPLATE, [False, False]), (LAST_ROLE_TEMPLATE, [False, False]), (LOOP_LAST_TEMPLATE, [False, False])],
    ids=["chatml", "plain", "eos", "slicing", "tool-lookahead", "rewriting", "counting", "last-role", "loop-last"],
)
def test_templates_that_defeat_one_rendering_fall_back_to_the_same_masks(
    tokenizer: PreTrainedTokenizerBase, template: str, served: list[bool]
) -> None:
    """Every template gives the reference's spans or the reference's error. One rendering serves the rows a template
    renders by reading the conversation in order and writing a generation prompt that depends on no turn (the
    lookahead of TOOL_TEMPLATE reads only around tool turns), and no other."""
    ensure_chat_template(tokenizer, template)
    sharegpt = {"conversations": SHAREGPT_ROW["conversations"] * 3}
    examples = [*_rows([sharegpt]), _forged_conversation(), _tool_conversation(), *_rows([tool_conversation(40)])]
    one_rendering = []
    for example in examples:
        reference = _outcome(prefix_assistant_spans, example, tokenizer)
        assert _outcome(assistant_spans, example, tokenizer) == reference
        if isinstance(reference, tuple):
            spans = _one_rendering(example, tokenizer, reference[0])
            assert spans in (None, reference[1])
            one_rendering.append(spans is not None)
    assert one_rendering == served
