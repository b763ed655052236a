"""Writes tool_calls.jsonl: a small synthetic tool-calling set in the OpenAI / Hugging Face chat format.

Each row offers the model three tools; the user asks something one of them answers; the assistant calls it, the
tool's result comes back, and the assistant answers from it. Written for raysft's examples (Apache-2.0, like the
project); rerun `python examples/data/make_tool_calls.py` to rebuild the file (same seed, same rows).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

ROWS = 240
SEED = 0

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["amount", "from", "to"]}}},
    {"type": "function", "function": {
        "name": "word_count", "description": "Count the words in a text.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}},
]

CITIES = ["Paris", "Lagos", "Lima", "Osaka", "Oslo", "Quito", "Hanoi", "Perth", "Porto", "Denver", "Nairobi", "Dublin"]
SKIES = ["sunny", "cloudy", "light rain", "windy", "snowing", "clear"]
RATES = {("USD", "EUR"): 0.92, ("EUR", "USD"): 1.09, ("GBP", "JPY"): 191.4, ("USD", "INR"): 83.2,
         ("CHF", "USD"): 1.13, ("EUR", "GBP"): 0.86}
SENTENCES = ["The quick brown fox jumps over the lazy dog", "Ray schedules tasks across a cluster",
             "Small models learn fast on small data", "Every checkpoint is verified before it is trusted",
             "Rain fell on the quiet town all night", "Pack short examples together to fill each row"]


def weather(rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any], str]:
    city, sky = rng.choice(CITIES), rng.choice(SKIES)
    unit = rng.choice(["celsius", "fahrenheit"])
    degrees = rng.randint(-5, 35) if unit == "celsius" else rng.randint(23, 95)
    symbol = "°C" if unit == "celsius" else "°F"
    question = rng.choice([f"What's the weather like in {city} right now? Give it in {unit}.",
                           f"Is it warm in {city} today? Use {unit}, please."])
    return (question, {"city": city, "unit": unit}, {"city": city, "temperature": degrees, "unit": unit, "sky": sky},
            f"In {city} it is {degrees}{symbol} and {sky}.")


def currency(rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any], str]:
    (source, target), rate = rng.choice(sorted(RATES.items()))
    amount = rng.choice([5, 20, 75, 120, 250, 1000, 1999])
    converted = round(amount * rate, 2)
    question = rng.choice([f"How much is {amount} {source} in {target}?",
                           f"Convert {amount} {source} to {target} for me."])
    return (question, {"amount": amount, "from": source, "to": target},
            {"amount": converted, "currency": target, "rate": rate},
            f"{amount} {source} is {converted} {target} (rate {rate}).")


def words(rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any], str]:
    text = rng.choice(SENTENCES)
    count = len(text.split())
    return (f'How many words are in "{text}"?', {"text": text}, {"words": count},
            f"That sentence has {count} words.")


def row(index: int, rng: random.Random) -> dict[str, Any]:
    name, kind = rng.choice([("get_weather", weather), ("convert_currency", currency), ("word_count", words)])
    question, arguments, result, answer = kind(rng)
    call_id = f"call_{index:04d}"
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "id": call_id, "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": call_id, "name": name, "content": json.dumps(result)},
        {"role": "assistant", "content": answer},
    ]}


def main() -> None:
    rng = random.Random(SEED)
    lines = [json.dumps(row(index, rng), ensure_ascii=False) for index in range(ROWS)]
    Path(__file__).with_name("tool_calls.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
