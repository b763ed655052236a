"""Row shapes in, one internal row schema out.

Every supported format becomes ``{"messages": [...] | None, "tools": [...] | None, "text": str | None,
"origin": str}``: conversations become ``messages``, plain text stays ``text``. Everything after this module
sees only that schema.

A message is the OpenAI / Hugging Face chat shape, checked and normalized here so that every chat template
receives what transformers documents for ``apply_chat_template``:

- ``{"role": "system" | "user", "content": str}``; in every role ``content`` may also be a list of OpenAI-style
  text parts (``[{"type": "text", "text": str}, ...]``), read as their texts joined with nothing between;
- ``{"role": "assistant", "content": str}``, optionally with ``"tool_calls": [{"type": "function",
  "function": {"name": str, "arguments": dict}, "id"?: str}]`` (``arguments`` given as a JSON string, as
  the OpenAI API writes it, is parsed into the dict templates expect; ``content`` may then be empty) and
  ``"reasoning_content": str`` (read from any of :data:`REASONING_KEYS`);
- ``{"role": "tool", "content": str}``, optionally with ``"tool_call_id"`` and ``"name"``: a tool's result.

Turns: an optional leading system message, then user and assistant alternating; an assistant turn with
tool_calls is followed by one or more tool turns, then the assistant again. The last turn is the
assistant's. ``tools`` is the row's list of tool schemas (JSON Schema, as ``apply_chat_template(tools=...)``
takes them), or None.
"""

from __future__ import annotations

import json
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
    # LLaMA-Factory's tool turns: the assistant's call(s) as JSON, and the tool's result.
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}

ROLES = ("system", "user", "assistant", "tool")

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
"""Keys an assistant turn's reasoning is read from; it is kept as ``reasoning_content``, the key chat templates
read (Qwen3, DeepSeek-R1; transformers also passes it as ``thinking``, the key gpt-oss templates read)."""

TEXT_PART_TYPES = ("text", "input_text", "output_text")
"""Content part types read as text: the Chat Completions API's, and the Responses API's input and output text."""

# Columns that hold a row's tool schemas (the OpenAI / HF name; LLaMA-Factory's sharegpt uses it too).
TOOLS_COLUMN = "tools"


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
        example = {"messages": None, "tools": None, "text": text, "origin": origin}
    else:
        messages = _conversation(row, fmt, source, origin)
        tools = _tools(row, origin)
        validate_conversation(messages, origin, tools)
        example = {"messages": messages, "tools": tools, "text": None, "origin": origin}
    if max_chars is not None:
        _check_size(example, max_chars)
    return example


def _conversation(row: dict[str, Any], fmt: str, source: SourceConfig, origin: str) -> list[dict[str, Any]]:
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
    if example["messages"] is None:
        chars = len(example["text"])
    else:  # the text the template renders from the data: content, reasoning, tool calls, tool schemas
        texts = [strings_in(value) for message in example["messages"] for key, value in message.items() if key != "role"]
        chars = sum(len(text) for group in [*texts, strings_in(example["tools"])] for text in group)
    if chars > max_chars:
        raise DataError(
            f"{example['origin']}: the row holds {chars:,} characters of text, more than data.max_row_chars "
            f"({max_chars:,}); drop or shorten the row, or raise data.max_row_chars if the tokenize workers "
            "have the memory for it"
        )


# Which roles may follow a turn (after the optional leading system message); "assistant+calls" is an
# assistant turn with tool_calls, whose results must come next.
_NEXT_ROLES = {
    "start": ("user",),
    "user": ("assistant",),
    "assistant": ("user",),
    "assistant+calls": ("tool",),
    "tool": ("tool", "assistant"),
}


def validate_conversation(
    messages: list[dict[str, Any]], origin: str, tools: list[dict[str, Any]] | None = None
) -> None:
    """Check the turn order (module docstring), that assistant turns say something, that a tool result
    answers a call of the assistant turn before it, and that calls name one of the row's `tools`."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{origin}: the conversation has no assistant turn, so there is nothing to train on")
    start = 1 if messages[0]["role"] == "system" else 0
    state = "start"
    call_ids: set[str] = set()  # ids of the calls the current tool turns answer
    tool_names = {tool_name(tool) for tool in tools or []}
    for index, message in enumerate(messages[start:], start):
        role = message["role"]
        expected = _NEXT_ROLES[state]
        if role not in expected:
            if role == "system":
                where = "only allowed as the first turn"
            else:
                where = "expected " + " or ".join(f"'{r}'" for r in expected)
                where += " after an assistant turn with tool_calls" if state == "assistant+calls" else ""
            raise DataError(
                f"{origin}: turn {index}: role '{role}' is out of order ({where}); turns must alternate "
                "user/assistant after an optional leading system message, and an assistant turn with tool_calls "
                "is followed by 'tool' turns with their results, then by the assistant again"
            )
        calls = message.get("tool_calls")
        if role == "assistant" and not calls and not message["content"].strip():
            raise DataError(f"{origin}: turn {index}: empty assistant content")
        if role == "assistant" and calls:
            for number, call in enumerate(calls):
                name = call["function"]["name"]
                if tools and name not in tool_names:
                    raise DataError(
                        f"{origin}: turn {index}: tool_calls[{number}] calls '{name}', which is not among the row's "
                        f"tools ({', '.join(sorted(tool_names))})"
                    )
            call_ids = {call["id"] for call in calls if "id" in call}
        if role == "tool" and "tool_call_id" in message and call_ids and message["tool_call_id"] not in call_ids:
            raise DataError(
                f"{origin}: turn {index}: tool_call_id {message['tool_call_id']!r} answers none of the calls of the "
                f"assistant turn before it ({', '.join(sorted(call_ids))})"
            )
        state = "assistant+calls" if role == "assistant" and calls else role
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


def _pair(row: dict[str, Any], prompt_col: str, response_col: str, origin: str) -> list[dict[str, Any]]:
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


def _alpaca_messages(row: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    instruction = _string_column(row, "instruction", origin)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{origin}: column 'input' must be a string, got {type(extra).__name__}")
    output = _string_column(row, "output", origin)
    if not output.strip():
        raise DataError(f"{origin}: empty response in column 'output'")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _prompt_completion_messages(row: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    prompt, completion = _column(row, "prompt", origin), _column(row, "completion", origin)
    if isinstance(prompt, list) and isinstance(completion, list):
        # Conversational prompt/completion (TRL's layout): both sides are message lists.
        return [_message(m, i, origin) for i, m in enumerate([*prompt, *completion])]
    return _pair(row, "prompt", "completion", origin)


def _messages_column(row: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    turns = _turns(row, "messages", origin)
    return [_message(m, i, origin) for i, m in enumerate(turns)]


def _message(message: Any, index: int, origin: str) -> dict[str, Any]:
    """One chat turn in the schema of the module docstring. Keys with a None value count as absent: columnar
    readers (Parquet, HF datasets) fill every key any row has into every row."""
    if not isinstance(message, dict):
        raise DataError(
            f"{origin}: turn {index}: expected an object with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{origin}: turn {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls is not None and _is_sequence(calls) and len(calls) == 0:
        calls = None  # an empty list, as some APIs write "no calls"
    if calls is not None and message.get("content") is None:
        content = ""  # the OpenAI API writes content: null beside tool calls
    else:
        content = _turn_content(message, "content", index, origin)
    normalized: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        normalized.update(_reasoning(message, index, origin))
        if calls is not None:
            normalized["tool_calls"] = _tool_calls(calls, index, origin)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            value = message.get(key)
            if value is not None:
                if not isinstance(value, str):
                    raise DataError(f"{origin}: turn {index}: '{key}' must be a string, got {type(value).__name__}")
                normalized[key] = value
    return normalized


def _reasoning(message: dict[str, Any], index: int, origin: str) -> dict[str, str]:
    given = {key: message[key] for key in REASONING_KEYS if message.get(key) is not None}
    if len(given) > 1:
        raise DataError(f"{origin}: turn {index}: reasoning is given twice ({', '.join(given)}); keep one")
    for key, value in given.items():
        if not isinstance(value, str):
            raise DataError(f"{origin}: turn {index}: '{key}' must be a string, got {type(value).__name__}")
        return {"reasoning_content": value}
    return {}


def _tool_calls(calls: Any, index: int, origin: str) -> list[dict[str, Any]]:
    """Tool calls in the shape chat templates read: ``{"type": "function", "function": {"name", "arguments"}}``
    with ``arguments`` a dict, and the call's ``id`` when given. The flat ``{"name", "arguments"}`` (Hermes,
    LLaMA-Factory) is read too."""
    shape = "{'type': 'function', 'function': {'name': ..., 'arguments': {...}}}"
    if not _is_sequence(calls):
        raise DataError(f"{origin}: turn {index}: 'tool_calls' must be a list of calls like {shape}, "
                        f"got {type(calls).__name__}")
    normalized = []
    for number, call in enumerate(calls):
        where = f"{origin}: turn {index}: tool_calls[{number}]"
        if not isinstance(call, dict):
            raise DataError(f"{where}: expected an object like {shape}, got {type(call).__name__}")
        if call.get("type") not in (None, "function"):
            raise DataError(f"{where}: type {call['type']!r} is not supported (only 'function')")
        function = call.get("function") if call.get("function") is not None else call
        if not isinstance(function, dict):
            raise DataError(f"{where}: 'function' must be an object with 'name' and 'arguments', "
                            f"got {type(function).__name__}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: the function 'name' must be a non-empty string, got {name!r}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: 'arguments' is not valid JSON ({err})") from None
        if not isinstance(arguments, dict):
            raise DataError(f"{where}: 'arguments' must be a JSON object (or a string holding one), "
                            f"got {type(arguments).__name__}")
        entry: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                raise DataError(f"{where}: 'id' must be a string, got {type(call['id']).__name__}")
            entry["id"] = call["id"]
        normalized.append(entry)
    return normalized


def _tools(row: dict[str, Any], origin: str) -> list[dict[str, Any]] | None:
    """The row's tool schemas (column 'tools': a list, or a JSON string holding one), or None."""
    tools = row.get(TOOLS_COLUMN)
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"{origin}: column 'tools' is not valid JSON ({err})") from None
    if tools is None:
        return None
    if not _is_sequence(tools):
        raise DataError(f"{origin}: column 'tools' must be a list of tool schemas, got {type(tools).__name__}")
    for number, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise DataError(f"{origin}: tools[{number}]: expected a JSON schema object, got {type(tool).__name__}")
        name = tool_name(tool)
        if not isinstance(name, str) or not name.strip():
            raise DataError(
                f"{origin}: tools[{number}]: no function name; expected "
                "{'type': 'function', 'function': {'name': ..., 'description': ..., 'parameters': {...}}}"
            )
    return list(tools) or None


def tool_name(tool: dict[str, Any]) -> Any:
    """The function name of a tool schema: ``{"type": "function", "function": {"name": ...}}`` or flat ``{"name": ...}``."""
    function = tool.get("function")
    return function.get("name") if isinstance(function, dict) else tool.get("name")


def _sharegpt_messages(row: dict[str, Any], origin: str) -> list[dict[str, Any]]:
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
        value = _turn_content(turn, "value", index, origin)
        if speaker == "function_call":
            # The value is the call, or a list of parallel calls, as JSON: {"name": ..., "arguments": ...}.
            try:
                calls = json.loads(value)
            except json.JSONDecodeError as err:
                raise DataError(f"{origin}: turn {index}: the function_call value is not valid JSON ({err})") from None
            calls = calls if isinstance(calls, list) else [calls]
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, index, origin)})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _is_sequence(value: Any) -> bool:
    # Columnar readers (Parquet, HF datasets) may hand back tuples or arrays; only a real sequence counts.
    return not isinstance(value, (str, bytes, dict)) and hasattr(value, "__len__")


def strings_in(value: Any) -> list[str]:
    """Every string value inside `value` (nested dicts and lists; not the keys): all the text of a
    conversation that a template may render.

    Example:
        >>> strings_in([{"role": "user", "content": "Hi"}, {"tool_calls": [{"function": {"name": "f"}}]}])
        ['user', 'Hi', 'f']
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in strings_in(item)]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in strings_in(item)]
    return []


def _turns(row: dict[str, Any], column: str, origin: str) -> list[Any]:
    turns = _column(row, column, origin)
    if not _is_sequence(turns):
        raise DataError(f"{origin}: column '{column}' must be a list of turns, got {type(turns).__name__}")
    if len(turns) == 0:
        raise DataError(f"{origin}: column '{column}' is an empty conversation")
    return list(turns)


def _turn_content(turn: dict[str, Any], key: str, index: int, origin: str) -> str:
    content = turn.get(key)
    if _is_sequence(content):
        return _text_of_parts(content, key, index, origin)
    if not isinstance(content, str):
        raise DataError(f"{origin}: turn {index}: '{key}' must be a string or a list of text parts, got "
                        f"{type(content).__name__}")
    return content


def _text_of_parts(parts: Any, key: str, index: int, origin: str) -> str:
    """OpenAI-style content parts (`[{"type": "text", "text": ...}, ...]`, as chat exports write them) as one
    text: the text parts in order, with nothing put between them (as the chat templates that read part lists
    render them; the parts' own text carries any space or newline). Other parts (images, audio, files) are
    refused: a text model cannot be trained on them, and dropping them would train on a different turn."""
    texts = []
    for number, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PART_TYPES:
            what = f"of type {kind!r}" if isinstance(part, dict) else f"a {type(part).__name__}, not an object"
            raise DataError(
                f"{origin}: turn {index}: '{key}' part {number} is {what}; raysft trains on text, so a content "
                f"part must be {{\"type\": \"text\", \"text\": ...}}. Remove the non-text parts or the row "
                "(invalid_rows: skip skips such rows)"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise DataError(f"{origin}: turn {index}: '{key}' part {number} ({kind}) needs a string 'text', got "
                            f"{type(text).__name__}")
        texts.append(text)
    return "".join(texts)
