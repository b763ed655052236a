"""Reading sources, detecting formats and normalizing rows (raysft.data.formats / sources)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysft.config import SourceConfig
from raysft.data.formats import REASONING_KEYS, detect_format, normalize_row
from raysft.errors import DataError
from raysft.data.sources import MAX_PROBLEMS, load_examples, read_source

QA_ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "Name a prime.", "answer": "7"},
    {"question": "Capital of France?", "answer": "Paris"},
]
QA_MESSAGES = [
    [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}] for row in QA_ROWS
]


def _src(**kwargs: Any) -> SourceConfig:
    return SourceConfig(**kwargs)


def _one(row: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Load a single inline row through the whole reader path."""
    return load_examples([_src(rows=[row], **kwargs)])[0]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- the shared data sets, read in place ------------------------------------------------------------


def test_gsm8k_jsonl_is_prompt_response(shared_data: Path) -> None:
    path = shared_data / "gsm8k" / "train.jsonl"
    first_row = next(iter(read_source(_src(path=str(path)))))[1]
    assert detect_format(first_row, _src(path=str(path))) == "prompt_response"
    examples = load_examples([_src(path=str(path), limit=5)])
    assert len(examples) == 5
    assert examples[0]["origin"] == f"{path}:1"
    assert examples[4]["origin"] == f"{path}:5"
    assert examples[0]["messages"] == [
        {"role": "user", "content": first_row["question"]},
        {"role": "assistant", "content": first_row["answer"]},
    ]
    assert examples[0]["text"] is None


def test_gsm8k_folder_reads_both_files_sorted(shared_data: Path) -> None:
    examples = load_examples([_src(path=str(shared_data / "gsm8k"))])
    assert len(examples) == 7473 + 1319
    # Sorted by name: test.jsonl before train.jsonl; the LICENSE file is not a data file.
    assert examples[0]["origin"].endswith("test.jsonl:1")
    assert examples[-1]["origin"].endswith("train.jsonl:7473")


def test_code_alpaca_json_is_alpaca_with_line_numbers(shared_data: Path) -> None:
    path = shared_data / "code_alpaca" / "code_alpaca_2k.json"
    raw = json.loads(path.read_text())
    examples = load_examples([_src(path=str(path), limit=10)])
    assert detect_format(raw[0], _src(path=str(path))) == "alpaca"
    # Row 0 (with input) starts on line 2 of the pretty-printed array, each row 5 lines later.
    assert examples[0]["origin"] == f"{path}:2 [0]"
    assert examples[3]["origin"] == f"{path}:17 [3]"
    assert examples[0]["messages"][0]["content"] == f"{raw[0]['instruction']}\n\n{raw[0]['input']}"
    assert raw[3]["input"] == ""
    assert examples[3]["messages"] == [
        {"role": "user", "content": raw[3]["instruction"]},
        {"role": "assistant", "content": raw[3]["output"]},
    ]


def test_code_alpaca_empty_outputs_are_reported_by_line(shared_data: Path) -> None:
    # The real file has two rows with an empty output; both are named in one error, first first.
    path = shared_data / "code_alpaca" / "code_alpaca_2k.json"
    with pytest.raises(DataError) as caught:
        load_examples([_src(path=str(path))])
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}:1187 [237]: empty response in column 'output'",
        f"{path}:9297 [1859]: empty response in column 'output'",
    ]


def test_sharegpt_json_multi_turn(shared_data: Path) -> None:
    path = shared_data / "sharegpt" / "identity_conversations.json"
    raw = json.loads(path.read_text())
    examples = load_examples([_src(path=str(path))])
    assert len(examples) == len(raw) == 500
    assert detect_format(raw[0], _src(path=str(path))) == "sharegpt"
    first = examples[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] * (len(raw[0]["conversations"]) // 2)
    assert [m["content"] for m in first] == [t["value"] for t in raw[0]["conversations"]]
    assert examples[0]["origin"] == f"{path}:2 [0]"


# --- every reader gives the same rows, with its own origin --------------------------------------


def _jsonl(tmp: Path) -> str:
    return str(_write_jsonl(tmp / "qa.jsonl", QA_ROWS))


def _json_array(tmp: Path) -> str:
    (tmp / "qa.json").write_text(json.dumps(QA_ROWS, indent=2))
    return str(tmp / "qa.json")


def _json_wrapped(tmp: Path) -> str:
    (tmp / "qa.json").write_text(json.dumps({"version": 1, "data": QA_ROWS}))
    return str(tmp / "qa.json")


def _csv(tmp: Path) -> str:
    with (tmp / "qa.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(QA_ROWS)
    return str(tmp / "qa.csv")


def _parquet(tmp: Path) -> str:
    pq.write_table(pa.Table.from_pylist(QA_ROWS), tmp / "qa.parquet")
    return str(tmp / "qa.parquet")


# Row 1's answer holds a newline, so in the CSV row 2 starts on line 4 and row 3 on line 5.
READERS: dict[str, tuple[Callable[[Path], str], list[str]]] = {
    "jsonl": (_jsonl, ["{p}:1", "{p}:2", "{p}:3"]),
    "json": (_json_array, ["{p}:2 [0]", "{p}:6 [1]", "{p}:10 [2]"]),
    "json-wrapped": (_json_wrapped, ["{p}:data[0]", "{p}:data[1]", "{p}:data[2]"]),
    "csv": (_csv, ["{p}:2", "{p}:4", "{p}:5"]),
    "parquet": (_parquet, ["{p}:row 1", "{p}:row 2", "{p}:row 3"]),
}


@pytest.mark.parametrize("reader", READERS)
def test_file_readers_agree(reader: str, tmp_path: Path) -> None:
    write, origins = READERS[reader]
    path = write(tmp_path)
    examples = load_examples([_src(path=path)])
    assert [e["messages"] for e in examples] == QA_MESSAGES
    assert [e["origin"] for e in examples] == [o.format(p=path) for o in origins]


def test_hf_dataset_from_disk(tmp_path: Path) -> None:
    datasets.Dataset.from_list(QA_ROWS).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(QA_ROWS), "test": datasets.Dataset.from_list(QA_ROWS[:1])}
    ).save_to_disk(str(tmp_path / "splits"))
    single = load_examples([_src(hf_dataset=str(tmp_path / "single"))])
    assert [e["messages"] for e in single] == QA_MESSAGES
    assert single[2]["origin"] == f"hf:{tmp_path / 'single'}[2]"
    test_split = load_examples([_src(hf_dataset=str(tmp_path / "splits"), split="test")])
    assert [e["messages"] for e in test_split] == QA_MESSAGES[:1]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        load_examples([_src(hf_dataset=str(tmp_path / "splits"), split="validation")])


def test_inline_rows_and_limit() -> None:
    examples = load_examples([_src(rows=QA_ROWS, limit=2)])
    assert [e["messages"] for e in examples] == QA_MESSAGES[:2]
    assert [e["origin"] for e in examples] == ["rows[0]", "rows[1]"]


def test_folder_glob_and_limit_across_files(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "b.jsonl", QA_ROWS[1:])
    _write_jsonl(tmp_path / "a.jsonl", QA_ROWS[:1])
    (tmp_path / "notes.txt").write_text("not data")
    folder = load_examples([_src(path=str(tmp_path))])
    assert [e["messages"] for e in folder] == QA_MESSAGES
    assert [Path(e["origin"]).name for e in folder] == ["a.jsonl:1", "b.jsonl:1", "b.jsonl:2"]
    globbed = load_examples([_src(path=str(tmp_path / "*.jsonl"), limit=2)])
    assert [Path(e["origin"]).name for e in globbed] == ["a.jsonl:1", "b.jsonl:1"]


def test_sources_concatenate_each_with_its_own_format() -> None:
    examples = load_examples([_src(rows=QA_ROWS[:1]), _src(rows=[{"text": "plain text"}])])
    assert examples[0]["messages"] == QA_MESSAGES[0]
    assert examples[1] == {"messages": None, "tools": None, "text": "plain text", "origin": "rows[0]"}


# --- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": [], "text": "x"}, "messages"),
        ({"conversations": [], "id": "1"}, "sharegpt"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"question": "q", "answer": "a"}, "prompt_response"),
        ({"prompt": "p", "response": "r"}, "prompt_response"),
        ({"input": "i", "output": "o"}, "prompt_response"),
        ({"text": "t", "meta": 1}, "text"),
    ],
)
def test_detect_format(row: dict[str, Any], expected: str) -> None:
    assert detect_format(row, _src(rows=[row])) == expected


def test_detect_format_error_lists_columns_and_options() -> None:
    with pytest.raises(DataError) as caught:
        load_examples([_src(rows=[{"q": "x", "a": "y"}])])
    message = str(caught.value)
    assert message.startswith("rows[0]: cannot detect the data format from columns ['a', 'q']")
    assert "prompt_column/response_column" in message and "sharegpt ('conversations')" in message


def test_configured_columns_win() -> None:
    example = _one({"q": "Why?", "a": "Because.", "text": "ignored"}, prompt_column="q", response_column="a")
    assert example["messages"] == [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]


def test_messages_format_keeps_role_and_content_only() -> None:
    messages = [
        {"role": "system", "content": "Be brief.", "name": "sys"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert _one({"messages": messages})["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_messages_in_parquet_and_hf_dataset(tmp_path: Path) -> None:
    # Columnar stores return list<struct> cells; they must normalize like JSON lists.
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chat_ds"))
    from_parquet = load_examples([_src(path=str(tmp_path / "chat.parquet"))])
    from_hf = load_examples([_src(hf_dataset=str(tmp_path / "chat_ds"))])
    assert from_parquet[0]["messages"] == from_hf[0]["messages"] == rows[0]["messages"]


def test_sharegpt_role_mapping() -> None:
    turns = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "U1"},
        {"from": "gpt", "value": "A1"},
        {"from": "user", "value": "U2"},
        {"from": "model", "value": "A2"},
    ]
    roles = [m["role"] for m in _one({"conversations": turns})["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_alpaca_input_joined_only_when_present() -> None:
    with_input = _one({"instruction": "Sum", "input": "1, 2", "output": "3"})
    without = _one({"instruction": "Sum", "input": "  ", "output": "3"})
    no_column = _one({"instruction": "Sum", "output": "3"}, format="alpaca")
    assert with_input["messages"][0]["content"] == "Sum\n\n1, 2"
    assert without["messages"][0]["content"] == no_column["messages"][0]["content"] == "Sum"


def test_prompt_completion_plain_and_conversational() -> None:
    plain = _one({"prompt": "2+2=", "completion": "4"})
    chat = _one(
        {"prompt": [{"role": "user", "content": "2+2="}], "completion": [{"role": "assistant", "content": "4"}]}
    )
    assert (
        plain["messages"]
        == chat["messages"]
        == [
            {"role": "user", "content": "2+2="},
            {"role": "assistant", "content": "4"},
        ]
    )


def test_text_format() -> None:
    assert _one({"text": "Once upon a time."}) == {
        "messages": None, "tools": None, "text": "Once upon a time.", "origin": "rows[0]"
    }


def test_system_prompt_added_only_when_missing() -> None:
    added = _one({"question": "Q", "answer": "A"}, system_prompt="Be kind.")
    assert added["messages"][0] == {"role": "system", "content": "Be kind."}
    kept = _one(
        {
            "messages": [
                {"role": "system", "content": "Own."},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
        system_prompt="Be kind.",
    )
    assert [m["content"] for m in kept["messages"]] == ["Own.", "Q", "A"]


def test_normalize_row_directly() -> None:
    row = normalize_row({"instruction": "I", "output": "O"}, "alpaca", _src(rows=[{}]), "here:1")
    assert row == {
        "messages": [{"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}],
        "tools": None,
        "text": None,
        "origin": "here:1",
    }


# --- bad input: every error names where it is ------------------------------------------------------


def test_malformed_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QA_ROWS[0]) + "\n\n" + '{"question": "x", "answer": }\n' + json.dumps(QA_ROWS[1]) + "\n")
    with pytest.raises(DataError) as caught:
        load_examples([_src(path=str(path))])
    assert str(caught.value).startswith(f"{path}:3: invalid JSON: Expecting value")


def test_malformed_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question": "a", "answer": "b"},\n  {"question": "c" "answer": "d"}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid JSON: Expecting ',' delimiter")):
        load_examples([_src(path=str(path))])


def test_json_array_of_non_objects(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[\n[1, 2]\n]")
    with pytest.raises(DataError, match=re.escape(f"{path}:2 [0]: expected a JSON object (one row), got list")):
        load_examples([_src(path=str(path))])


def test_csv_row_with_too_many_cells(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nq1,a1\nq2,a2,extra\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: the row has more cells than the header")):
        load_examples([_src(path=str(path))])


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"question": "Q"}, "prompt_response", "rows[0]: missing column 'answer'"),
        ({"instruction": "I", "input": ""}, "alpaca", "rows[0]: missing column 'output'"),
        ({"question": "Q", "answer": "  "}, "prompt_response", "rows[0]: empty response in column 'answer'"),
        ({"question": "Q", "answer": 5}, "prompt_response", "rows[0]: column 'answer' must be a string, got int"),
        ({"text": ""}, "text", "rows[0]: column 'text' is empty"),
        (
            {"conversations": [{"from": "robot", "value": "x"}]},
            "sharegpt",
            "rows[0]: turn 0: unknown role 'robot' in 'from'",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "function", "content": "A"}]},
            "messages",
            "rows[0]: turn 1: unknown role 'function'",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}]},
            "messages",
            "rows[0]: turn 1: 'content' must be a string or a list of text parts, got NoneType",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]},
            "messages",
            "rows[0]: turn 1: empty assistant content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q1"},
                    {"role": "user", "content": "Q2"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "messages",
            "rows[0]: turn 1: role 'user' is out of order (expected 'assistant')",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": "A"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "messages",
            "rows[0]: turn 0: role 'assistant' is out of order (expected 'user')",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "system", "content": "S"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "messages",
            "rows[0]: turn 1: role 'system' is out of order (only allowed as the first turn)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                    {"role": "user", "content": "Q2"},
                ]
            },
            "messages",
            "rows[0]: the conversation ends with a 'user' turn",
        ),
        (
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
            "messages",
            "rows[0]: the conversation has no assistant turn",
        ),
        ({"messages": []}, "messages", "rows[0]: column 'messages' is an empty conversation"),
        ({"messages": "hi"}, "messages", "rows[0]: column 'messages' must be a list of turns, got str"),
    ],
)
def test_bad_rows_name_their_origin(row: dict[str, Any], fmt: str, message: str) -> None:
    with pytest.raises(DataError) as caught:
        load_examples([_src(rows=[row], format=fmt)])
    assert str(caught.value).startswith(message)


def test_bad_row_in_a_file_names_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", [QA_ROWS[0], {"question": "Q", "answer": ""}, QA_ROWS[1]])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: empty response in column 'answer'")):
        load_examples([_src(path=str(path))])


def test_problems_are_collected_first_first_and_capped() -> None:
    rows = [QA_ROWS[0]] + [{"question": f"Q{i}", "answer": ""} for i in range(1, 15)]
    with pytest.raises(DataError) as caught:
        load_examples([_src(rows=rows)])
    lines = str(caught.value).splitlines()
    assert lines[0] == "rows[1]: empty response in column 'answer'"
    assert lines[MAX_PROBLEMS - 1].startswith(f"rows[{MAX_PROBLEMS}]:")
    assert lines[MAX_PROBLEMS:] == [f"(stopped after {MAX_PROBLEMS} problems; fix these and run again)"]


def test_problems_from_several_sources_are_reported_together(tmp_path: Path) -> None:
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("{oops\n")
    sources = [_src(path=str(bad_file)), _src(rows=[{"question": "Q"}], format="prompt_response")]
    with pytest.raises(DataError) as caught:
        load_examples(sources)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"{bad_file}:1: invalid JSON")
    assert lines[1] == "rows[0]: missing column 'answer' (columns: ['question'])"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda p: (p / "empty.jsonl").write_text("\n\n") and str(p / "empty.jsonl"),
            "empty.jsonl: the file holds no rows",
        ),
        (lambda p: (p / "empty.json").write_text("") or str(p / "empty.json"), "empty.json: the file is empty"),
        (lambda p: (p / "empty.json").write_text("[]") and str(p / "empty.json"), "empty.json: the file holds no rows"),
        (lambda p: str(p / "missing.jsonl"), "missing.jsonl: no such file or folder"),
        (lambda p: str(p / "*.parquet"), "*.parquet: the pattern matches no"),
        (lambda p: str(p), ": no .csv/.json/.jsonl/.parquet files in the folder"),
        (lambda p: (p / "data.txt").write_text("x") and str(p / "data.txt"), "data.txt: cannot tell the file type"),
        (lambda p: (p / "obj.json").write_text('{"a": 1}') and str(p / "obj.json"), "obj.json: expected a JSON array"),
    ],
)
def test_unreadable_paths(setup: Callable[[Path], str], message: str, tmp_path: Path) -> None:
    path = setup(tmp_path)
    with pytest.raises(DataError) as caught:
        load_examples([_src(path=path)])
    assert str(caught.value).startswith(str(tmp_path)) and message in str(caught.value)


def test_empty_inline_rows() -> None:
    with pytest.raises(DataError, match=r"^rows: no rows given"):
        load_examples([_src(rows=[])])


# --- tool calls, tool results and reasoning (OpenAI / Hugging Face chat format) ----------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def tool_row(**changes: Any) -> dict[str, Any]:
    """A tool conversation as the OpenAI API writes it (arguments and tools as JSON strings, content null beside
    the call); `changes` replace turns by index (`turn1=...`) or the row's columns."""
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22 C, sunny"},
        {"role": "assistant", "content": "22 C and sunny."},
    ]
    row: dict[str, Any] = {"messages": messages, "tools": json.dumps([WEATHER_TOOL])}
    for key, value in changes.items():
        if key.startswith("turn"):
            messages[int(key[4:])] = value
        else:
            row[key] = value
    return row


def test_openai_tool_conversation_is_normalized_as_chat_templates_read_it() -> None:
    example = _one(tool_row())
    assert example["tools"] == [WEATHER_TOOL]  # a JSON string column, parsed
    assert example["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "call_1"}]},  # arguments: a dict
        {"role": "tool", "content": "22 C, sunny", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "assistant", "content": "22 C and sunny."},
    ]


def test_call_shapes_normalize_alike() -> None:
    given = [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},  # HF: a dict
        {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},  # no type
        {"name": "get_weather", "arguments": {"city": "Paris"}},  # flat (Hermes, LLaMA-Factory)
    ]
    for call in given:
        turn = {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}
        assert _one(tool_row(turn1=turn, turn2={"role": "tool", "content": "22 C"}))["messages"][1] == {
            "role": "assistant", "content": "Let me look.", "tool_calls": [CALL]}


def test_reasoning_is_read_from_any_of_its_names() -> None:
    for key in REASONING_KEYS:
        row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", key: "Add."}]}
        assert _one(row)["messages"][1] == {"role": "assistant", "content": "4", "reasoning_content": "Add."}


def test_a_conversation_may_end_with_the_assistants_call() -> None:
    # Single-step function calling data: the example teaches the call itself.
    row = {"messages": tool_row()["messages"][:2], "tools": [WEATHER_TOOL]}
    assert _one(row)["messages"][-1]["tool_calls"] == [{**CALL, "id": "call_1"}]


def test_sharegpt_function_call_and_observation_as_llama_factory_writes_them() -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "22 C, sunny"},
            {"from": "gpt", "value": "22 C and sunny."},
        ],
        "tools": json.dumps([WEATHER_TOOL]),
    }
    example = _one(row)
    assert example["tools"] == [WEATHER_TOOL]
    assert example["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "22 C, sunny"},
        {"role": "assistant", "content": "22 C and sunny."},
    ]
    parallel = json.dumps([CALL["function"], CALL["function"]])  # a list: parallel calls in one turn
    row["conversations"][1]["value"] = parallel
    assert _one(row)["messages"][1]["tool_calls"] == [CALL, CALL]


def test_tool_rows_in_parquet_read_like_json(tmp_path: Path) -> None:
    # Columnar files give every turn every key (None where a turn had none): None counts as absent.
    rows = [tool_row(tools=json.dumps([WEATHER_TOOL])), {"messages": QA_MESSAGES[0], "tools": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "tools.parquet")
    from_parquet = load_examples([_src(path=str(tmp_path / "tools.parquet"))])
    from_json = load_examples([_src(path=str(_write_jsonl(tmp_path / "tools.jsonl", rows)))])
    assert [e["messages"] for e in from_parquet] == [e["messages"] for e in from_json]
    assert from_parquet[1]["messages"] == QA_MESSAGES[0] and from_parquet[1]["tools"] is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (tool_row(turn1={"role": "assistant", "content": None, "tool_calls": {"name": "get_weather"}}),
         "rows[0]: turn 1: 'tool_calls' must be a list of calls"),
        (tool_row(turn1={"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}),
         "rows[0]: turn 1: tool_calls[0]: the function 'name' must be a non-empty string, got None"),
        (tool_row(turn1={"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": '{"city": Paris}'}}]}),
         "rows[0]: turn 1: tool_calls[0]: 'arguments' is not valid JSON"),
        (tool_row(turn1={"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": '["Paris"]'}}]}),
         "rows[0]: turn 1: tool_calls[0]: 'arguments' must be a JSON object (or a string holding one), got list"),
        (tool_row(turn1={"role": "assistant", "content": "", "tool_calls": [{"type": "code", "function": CALL["function"]}]}),
         "rows[0]: turn 1: tool_calls[0]: type 'code' is not supported"),
        (tool_row(turn1={"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_time", "arguments": {}}}]}),
         "rows[0]: turn 1: tool_calls[0] calls 'get_time', which is not among the row's tools (get_weather)"),
        (tool_row(turn1={"role": "tool", "content": "22 C"}),
         "rows[0]: turn 1: role 'tool' is out of order (expected 'assistant')"),
        (tool_row(turn2={"role": "user", "content": "And?"}),
         "rows[0]: turn 2: role 'user' is out of order (expected 'tool' after an assistant turn with tool_calls)"),
        (tool_row(turn3={"role": "user", "content": "And?"}),
         "rows[0]: turn 3: role 'user' is out of order (expected 'tool' or 'assistant')"),
        (tool_row(turn2={"role": "tool", "tool_call_id": "call_9", "content": "22 C"}),
         "rows[0]: turn 2: tool_call_id 'call_9' answers none of the calls of the assistant turn before it (call_1)"),
        (tool_row(turn2={"role": "tool", "content": None}), "rows[0]: turn 2: 'content' must be a string or a list of text parts, got NoneType"),
        (tool_row(turn3={"role": "assistant", "content": "Sunny.", "reasoning_content": "a", "thinking": "b"}),
         "rows[0]: turn 3: reasoning is given twice (reasoning_content, thinking)"),
        (tool_row(turn3={"role": "assistant", "content": "Sunny.", "reasoning": ["a"]}),
         "rows[0]: turn 3: 'reasoning' must be a string, got list"),
        (tool_row(tools="[{"), "rows[0]: column 'tools' is not valid JSON"),
        (tool_row(tools=[{"type": "function", "function": {"description": "no name"}}]), "rows[0]: tools[0]: no function name"),
        (tool_row(tools={"name": "get_weather"}), "rows[0]: column 'tools' must be a list of tool schemas, got dict"),
        ({"messages": tool_row()["messages"][:3]}, "rows[0]: the conversation ends with a 'tool' turn"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "get_weather(Paris)"}]},
         "rows[0]: turn 1: the function_call value is not valid JSON"),
    ],
)
def test_bad_tool_rows_name_their_origin(row: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError) as caught:
        load_examples([_src(rows=[row])])
    assert str(caught.value).startswith(message), str(caught.value)


def test_bad_tool_call_in_a_file_names_file_and_line(tmp_path: Path) -> None:
    bad_call = {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": '{"city": '}}]}
    path = _write_jsonl(tmp_path / "tools.jsonl", [tool_row(), tool_row(turn1=bad_call)])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: turn 1: tool_calls[0]: 'arguments' is not valid JSON")):
        load_examples([_src(path=str(path))])


def test_tool_text_counts_toward_max_row_chars() -> None:
    row = tool_row(turn2={"role": "tool", "tool_call_id": "call_1", "content": "x" * 500})
    with pytest.raises(DataError, match=r"rows\[0\]: the row holds \d+ characters of text, more than"):
        load_examples([_src(rows=[row])], max_row_chars=500)


# --- OpenAI-style content parts ------------------------------------------------------------------------------


def _parts(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text} for text in texts]


def test_text_content_parts_are_read_as_their_texts_joined(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": _parts("Be brief.")},
                      {"role": "user", "content": _parts("What is ", "2+2?\n", "Answer with a number.")},
                      {"role": "assistant", "content": [{"type": "output_text", "text": "4"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                      {"role": "assistant", "content": "Hello."}]},  # parts and strings mix freely
    ]
    expected = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?\nAnswer with a number."},
         {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    ]
    assert [e["messages"] for e in load_examples([_src(path=str(_write_jsonl(tmp_path / "chat.jsonl", rows)))])] == expected
    # Parquet holds parts as a list of structs: every part gets every key any part has (None when absent).
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "chat.parquet")
    assert load_examples([_src(path=str(tmp_path / "chat.parquet"))])[0]["messages"] == expected[0]


@pytest.mark.parametrize(
    ("part", "said"),
    [
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "part 1 is of type 'image_url'"),
        ({"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}, "part 1 is of type 'input_audio'"),
        ({"text": "no type"}, "part 1 is of type None"),
        ("just a string", "part 1 is a str, not an object"),
    ],
)
def test_non_text_content_parts_refused_by_name_with_file_and_line(tmp_path: Path, part: Any, said: str) -> None:
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    bad = {"messages": [{"role": "user", "content": [*_parts("What is in this?"), part]},
                        {"role": "assistant", "content": "A"}]}
    path = _write_jsonl(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(DataError) as caught:
        load_examples([_src(path=str(path))])
    assert str(caught.value).startswith(f"{path}:2: turn 0: 'content' {said}; raysft trains on text, so a content part "
                                        'must be {"type": "text", "text": ...}. Remove the non-text parts or the row '
                                        "(invalid_rows: skip skips such rows)"), str(caught.value)
    assert load_examples([_src(path=str(path), invalid_rows="skip")])[0]["messages"][0]["content"] == "Q"
