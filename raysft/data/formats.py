"""Row shapes in, one internal row schema out.

Every supported format becomes ``{"messages": [...] | None, "text": str | None, "origin": str}``:
conversations become ``messages`` (roles system/user/assistant, alternating, ending with the
assistant), plain text stays ``text``. Everything after this module sees only that schema.
"""

from __future__ import annotations

from typing import Any

from raysft.config import SourceConfig
from raysft.errors import DataError

FORMATS = ("prompt_response", "prompt_completion", "alpaca", "messages", "sharegpt", "text")

# Column pairs recognised as prompt/response when no columns are configured, in priority order.
PROMPT_RESPONSE_PAIRS = (("question", "answer"), ("prompt", "response"), ("input", "output"))

# ShareGPT dumps use several speaker names; keep the mapping small and explicit so that an
# unexpected speaker is an error instead of a silent guess.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

ROLES = ("system", "user", "assistant")


def source_name(source: SourceConfig) -> str:
    """A short name for a source, used where no row origin exists yet."""
    if source.path is not None:
        return source.path
    if source.hf_dataset is not None:
        return f"hf:{source.hf_dataset}"
    return "rows"


def detect_format(row: dict[str, Any], source: SourceConfig, origin: str | None = None) -> str:
    """Guess a source's format from the columns of one row.

    Example:
        >>> detect_format({"question": "2+2?", "answer": "4"}, SourceConfig(rows=[{}]))
        'prompt_response'
    """
    if source.prompt_column is not None or source.response_column is not None:
        # Configured columns state the user's intent; they beat any guess from column names.
        return "prompt_response"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if any(p in row and r in row for p, r in PROMPT_RESPONSE_PAIRS):
        return "prompt_response"
    if "text" in row:
        return "text"
    pairs = ", ".join(f"{p}+{r}" for p, r in PROMPT_RESPONSE_PAIRS)
    raise DataError(
        f"{origin or source_name(source)}: cannot detect the data format from columns {sorted(row)}. "
        "Expected one of: messages (column 'messages'), sharegpt ('conversations'), "
        "alpaca ('instruction'+'output'), prompt_completion ('prompt'+'completion'), "
        f"prompt_response ({pairs}), text ('text'). "
        "Set the source's prompt_column/response_column, or its format explicitly."
    )


def normalize_row(
    row: dict[str, Any], fmt: str, source: SourceConfig, origin: str, max_chars: int | None = None
) -> dict[str, Any]:
    """Turn one raw row of format `fmt` into the internal schema, validating it.

    A row with more than `max_chars` characters of text (None: no limit) is invalid: one giant row
    would exhaust the memory of the actor that tokenizes it.

    Example:
        >>> src = SourceConfig(rows=[{}])
        >>> normalize_row({"question": "2+2?", "answer": "4"}, "prompt_response", src, "rows[0]")["messages"]
        [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
    """
    if fmt == "text":
        text = _string_column(row, "text", origin)
        if not text:
            raise DataError(f"{origin}: column 'text' is empty")
        example = {"messages": None, "text": text, "origin": origin}
    else:
        messages = _conversation(row, fmt, source, origin)
        validate_conversation(messages, origin)
        example = {"messages": messages, "text": None, "origin": origin}
    if max_chars is not None:
        _check_size(example, max_chars)
    return example


def _conversation(row: dict[str, Any], fmt: str, source: SourceConfig, origin: str) -> list[dict[str, str]]:
    if fmt == "messages":
        messages = _messages_column(row, origin)
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(row, origin)
    elif fmt == "alpaca":
        messages = _alpaca_messages(row, origin)
    elif fmt == "prompt_completion":
        messages = _prompt_completion_messages(row, origin)
    elif fmt == "prompt_response":
        prompt_col, response_col = _prompt_response_columns(row, source, origin)
        messages = _pair(row, prompt_col, response_col, origin)
    else:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    if source.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": source.system_prompt}, *messages]
    return messages


def _check_size(example: dict[str, Any], max_chars: int) -> None:
    texts = [m["content"] for m in example["messages"]] if example["messages"] is not None else [example["text"]]
    chars = sum(len(text) for text in texts)
    if chars > max_chars:
        raise DataError(
            f"{example['origin']}: the row holds {chars:,} characters of text, more than data.max_row_chars "
            f"({max_chars:,}); drop or shorten the row, or raise data.max_row_chars if the tokenize workers "
            "have the memory for it"
        )


def validate_conversation(messages: list[dict[str, str]], origin: str) -> None:
    """Check roles alternate user/assistant after an optional system turn and end with the assistant."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{origin}: the conversation has no assistant turn, so there is nothing to train on")
    start = 1 if messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages[start:], start):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = "only allowed as the first turn" if message["role"] == "system" else f"expected '{expected}'"
            raise DataError(
                f"{origin}: turn {index}: role '{message['role']}' is out of order ({where}); "
                "turns must alternate user/assistant after an optional leading system message"
            )
        if expected == "assistant" and not message["content"].strip():
            raise DataError(f"{origin}: turn {index}: empty assistant content")
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{origin}: the conversation ends with a '{messages[-1]['role']}' turn; "
            "the last turn must be the assistant's (drop the trailing turn)"
        )


def _column(row: dict[str, Any], column: str, origin: str) -> Any:
    if column not in row:
        raise DataError(f"{origin}: missing column '{column}' (columns: {sorted(row)})")
    return row[column]


def _string_column(row: dict[str, Any], column: str, origin: str) -> str:
    value = _column(row, column, origin)
    if not isinstance(value, str):
        raise DataError(f"{origin}: column '{column}' must be a string, got {type(value).__name__}")
    return value


def _pair(row: dict[str, Any], prompt_col: str, response_col: str, origin: str) -> list[dict[str, str]]:
    prompt = _string_column(row, prompt_col, origin)
    response = _string_column(row, response_col, origin)
    if not response.strip():
        raise DataError(f"{origin}: empty response in column '{response_col}'")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _prompt_response_columns(row: dict[str, Any], source: SourceConfig, origin: str) -> tuple[str, str]:
    prompt_col, response_col = source.prompt_column, source.response_column
    if prompt_col is not None and response_col is not None:
        return prompt_col, response_col
    # An unconfigured side comes from the first known pair whose two columns are both present;
    # failing that, from a pair with one column present, so the error names the missing one.
    candidates = [(prompt_col or p, response_col or r) for p, r in PROMPT_RESPONSE_PAIRS]
    for found in (all, any):
        for candidate in candidates:
            if found(column in row for column in candidate):
                return candidate
    raise DataError(
        f"{origin}: cannot find prompt/response columns in {sorted(row)}; "
        "set the source's prompt_column and response_column"
    )


def _alpaca_messages(row: dict[str, Any], origin: str) -> list[dict[str, str]]:
    instruction = _string_column(row, "instruction", origin)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{origin}: column 'input' must be a string, got {type(extra).__name__}")
    output = _string_column(row, "output", origin)
    if not output.strip():
        raise DataError(f"{origin}: empty response in column 'output'")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _prompt_completion_messages(row: dict[str, Any], origin: str) -> list[dict[str, str]]:
    prompt, completion = _column(row, "prompt", origin), _column(row, "completion", origin)
    if isinstance(prompt, list) and isinstance(completion, list):
        # Conversational prompt/completion (TRL's layout): both sides are message lists.
        return [_message(m, i, origin) for i, m in enumerate([*prompt, *completion])]
    return _pair(row, "prompt", "completion", origin)


def _messages_column(row: dict[str, Any], origin: str) -> list[dict[str, str]]:
    turns = _turns(row, "messages", origin)
    return [_message(m, i, origin) for i, m in enumerate(turns)]


def _message(message: Any, index: int, origin: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise DataError(
            f"{origin}: turn {index}: expected an object with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{origin}: turn {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    return {"role": role, "content": _turn_content(message, "content", index, origin)}


def _sharegpt_messages(row: dict[str, Any], origin: str) -> list[dict[str, str]]:
    messages = []
    for index, turn in enumerate(_turns(row, "conversations", origin)):
        if not isinstance(turn, dict):
            raise DataError(
                f"{origin}: turn {index}: expected an object with 'from' and 'value', got {type(turn).__name__}"
            )
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"{origin}: turn {index}: unknown role {speaker!r} in 'from' "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _turn_content(turn, "value", index, origin)})
    return messages


def _turns(row: dict[str, Any], column: str, origin: str) -> list[Any]:
    turns = _column(row, column, origin)
    # Columnar readers (Parquet, HF datasets) may hand back tuples or arrays; only a real sequence counts.
    if isinstance(turns, (str, bytes, dict)) or not hasattr(turns, "__len__"):
        raise DataError(f"{origin}: column '{column}' must be a list of turns, got {type(turns).__name__}")
    if len(turns) == 0:
        raise DataError(f"{origin}: column '{column}' is an empty conversation")
    return list(turns)


def _turn_content(turn: dict[str, Any], key: str, index: int, origin: str) -> str:
    content = turn.get(key)
    if not isinstance(content, str):
        raise DataError(f"{origin}: turn {index}: '{key}' must be a string, got {type(content).__name__}")
    return content
