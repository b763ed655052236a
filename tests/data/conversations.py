"""Long tool-calling conversations with reasoning, generated (agent traces run to 50-200 turns): the masks' tests
and benchmarks/data_scale.py's long-conversation part read the same rows."""

from __future__ import annotations

import json
import random
from typing import Any

TOOLS = [
    {"type": "function", "function": {"name": "search", "description": "Search the notes.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "calculate", "description": "Evaluate arithmetic.",
                                      "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}},
]
_WORDS = ("the model reads every note and answers with care so that each reply is short clear and right about "
          "numbers dates names places and steps of a plan").split()


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def tool_conversation(messages: int, seed: int = 0) -> dict[str, Any]:
    """A row of `messages` messages (at least 3): system, user, then rounds of an assistant turn with reasoning and
    one or two tool calls, their results, and now and then an answer and the user's next question."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful agent."},
                                  {"role": "user", "content": _text(rng, 5, 20) + "?"}]
    while len(rows) < messages:
        if rows[-1]["role"] in ("user", "tool") and rng.random() < 0.7:
            calls = [{"type": "function", "function": {
                "name": rng.choice(("search", "calculate")), "arguments": json.dumps({"query": _text(rng, 1, 4)})}}
                for _ in range(rng.randint(1, 2))]
            rows.append({"role": "assistant", "content": "", "reasoning_content": _text(rng, 5, 30),
                         "tool_calls": calls})
            rows += [{"role": "tool", "content": _text(rng, 3, 25)} for _ in calls]
        elif rows[-1]["role"] == "assistant" and not rows[-1].get("tool_calls"):
            rows.append({"role": "user", "content": _text(rng, 3, 15) + "?"})
        else:
            rows.append({"role": "assistant", "content": _text(rng, 5, 40), "reasoning_content": _text(rng, 3, 15)})
    rows = rows[:messages]
    while rows[-1]["role"] != "assistant":  # a trace ends with the agent's turn
        rows.pop()
    return {"messages": rows, "tools": TOOLS}
