"""Task metrics of generated answers (`eval.generate`): the built-in scorers, user functions, and the prompts
that cross from the driver to the workers. Pure Python (no torch): tested alone, and light enough for
raysft.training.inputs, which Ray's controller imports.

Where the prompts come from is raysft.data.prompts; generating the answers on the workers is
raysft.training.generate_eval; the greedy, batched generation itself is raysft.infer's, shared with
`raysft generate` and the quickstart.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from raysft.config import GenerateMetricConfig
from raysft.errors import ConfigError, RunError


@dataclass(frozen=True)
class GenerationSet:
    """What every worker generates from at each evaluation: token ids of the first `eval.generate.num_prompts`
    eval examples up to their last assistant turn (chat template and generation prompt included, exactly as
    trained), and that turn's text as the reference. Small: N prompts of at most max_seq_len tokens."""

    prompts: tuple[tuple[int, ...], ...]
    references: tuple[str, ...]
    origins: tuple[str, ...]
    """Where each example was read (file:line), for messages and generations.jsonl."""


# --- answers: extract, then normalize -----------------------------------------------------------------------

_PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019"


def _number(text: str) -> str:
    """A number written canonically (`1,000.00` -> `1000`, `$18.` -> `18`); other text as it is."""
    bare = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(bare)
    except ValueError:
        return text
    if not math.isfinite(value):
        return text
    return str(int(value)) if value.is_integer() else repr(value)


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "whitespace": lambda text: " ".join(text.split()),
    "lower": str.casefold,
    "strip_punctuation": lambda text: text.strip().strip(_PUNCTUATION).strip(),
    "number": _number,
}
"""`eval.generate.metrics[].normalize` steps by name."""


def extract(text: str, pattern: str | None) -> str | None:
    """The answer `pattern` finds in `text`: its first group (or the whole match) at the first match; None when it
    does not match. Without a pattern, the text itself.

    Example:
        >>> extract("so 3 + 4 = 7.\\n#### 7", r"####\\s*(-?[\\d,.]+)")
        '7'
    """
    if pattern is None:
        return text
    found = re.search(pattern, text)
    if found is None:
        return None
    return found.group(1) if found.re.groups else found.group(0)


def answer(text: str, metric: GenerateMetricConfig) -> str | None:
    """`text` as metric compares it: extracted, then normalized step by step; None when extraction fails."""
    found = extract(text, metric.extract)
    if found is None:
        return None
    for step in metric.normalize:
        found = NORMALIZERS[step](found)
    return found


# --- built-in scores ------------------------------------------------------------------------------------------


Normalize = Callable[[str], "str | None"]


def _unchanged(text: str) -> str:
    return text


def mean_over_pairs(score: Callable[[str, str], float], predictions: Sequence[str], references: Sequence[str],
                    normalize: Normalize = _unchanged) -> float:
    """The mean of `score(prediction, reference)` over the normalized pairs; a pair either side of which normalizes
    to None (no answer extracted) scores 0."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("a score needs at least one prediction")
    total = 0.0
    for prediction, reference in zip(predictions, references):
        got, wanted = normalize(prediction), normalize(reference)
        total += score(got, wanted) if got is not None and wanted is not None else 0.0
    return total / len(references)


def exact_match(predictions: Sequence[str], references: Sequence[str], normalize: Normalize = _unchanged) -> float:
    """Fraction of predictions whose normalized answer equals the reference's.

    Example:
        >>> exact_match(["Paris", "The answer is Rome"], ["Paris", "Rome"])
        0.5
    """
    return mean_over_pairs(lambda got, wanted: float(got == wanted), predictions, references, normalize)


def contains(predictions: Sequence[str], references: Sequence[str], normalize: Normalize = _unchanged) -> float:
    """Fraction of predictions in which the normalized reference occurs.

    Example:
        >>> contains(["The capital is Paris.", "Lyon"], ["Paris", "Rome"])
        0.5
    """
    return mean_over_pairs(lambda got, wanted: float(wanted in got), predictions, references, normalize)


def _words(text: str) -> list[str]:
    # rouge_score's default tokenizer: lowercase, runs of ASCII letters and digits (no stemming).
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair: the longest common subsequence of words against both lengths (Lin 2004; what
    rouge_score's `rougeL` computes without stemming).

    Example:
        >>> round(rouge_l_f1("the cat sat on the mat", "the cat is on the mat"), 4)
        0.8333
    """
    candidate, target = _words(prediction), _words(reference)
    if not candidate or not target:
        return 0.0
    # One row of the LCS table at a time: O(len(target)) memory.
    previous = [0] * (len(target) + 1)
    for word in candidate:
        current = [0]
        for j, other in enumerate(target):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(target)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str], normalize: Normalize = _unchanged) -> float:
    """Mean ROUGE-L F1 over the pairs.

    Example:
        >>> rouge_l(["the cat sat", "dog"], ["the cat sat", "cat"])
        0.5
    """
    return mean_over_pairs(rouge_l_f1, predictions, references, normalize)


BUILT_IN: dict[str, Callable[..., float]] = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l}


# --- user functions -----------------------------------------------------------------------------------------


def load_function(spec: str | Callable[..., Any], key: str) -> Callable[..., Any]:
    """The callable `spec` names (`module:function`, attribute paths allowed), or `spec` itself; a ConfigError
    naming `key` when it cannot be imported or is not callable."""
    if callable(spec):
        return spec
    module_name, _, attribute = spec.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError([f"{key}: cannot import module {module_name!r} ({err}); it must be importable on the "
                           "driver and every worker (installed, on PYTHONPATH, or in the job's working_dir)"]) from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigError([f"{key}: module {module_name!r} has no {attribute!r}"])
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError([f"{key}: {spec} is a {type(found).__name__}, not a function"])
    return found


def _metric_key(index: int, field: str) -> str:
    return f"eval.generate.metrics.{index}.{field}"


def check_functions(metrics: Sequence[GenerateMetricConfig]) -> list[str]:
    """Problems importing the metrics' user functions ([] when fine): checked in the driver before Ray starts."""
    problems: list[str] = []
    for index, metric in enumerate(metrics):
        if metric.function is not None:
            try:
                load_function(metric.function, _metric_key(index, "function"))
            except ConfigError as err:
                problems += err.problems
    return problems


def _as_scores(result: Any, metric: GenerateMetricConfig, key: str) -> dict[str, float]:
    """A user function's result as logged metrics: a number -> eval_<name>; a dict -> eval_<name>_<key>."""
    items = result.items() if isinstance(result, dict) else [(None, result)]
    scores = {}
    for sub, value in items:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RunError(f"{key}: returned {result!r}; expected a finite number or a dict of finite numbers")
        scores[metric.metric_name if sub is None else f"{metric.metric_name}_{sub}"] = float(value)
    return scores


def score_generations(predictions: Sequence[str], references: Sequence[str],
                      metrics: Sequence[GenerateMetricConfig]) -> dict[str, float]:
    """Every metric of `metrics` on the generated `predictions`, as logged: {"eval_<name>": value, ...}.

    Example:
        >>> from raysft.config import GenerateMetricConfig as M
        >>> score_generations(["#### 1,000", "#### 3"], ["... #### 1000", "#### 4"],
        ...                   [M(type="exact_match", extract=r"####\\s*(-?[\\d,.]+)", normalize=["number"])])
        {'eval_exact_match': 0.5}
    """
    scores: dict[str, float] = {}
    for index, metric in enumerate(metrics):
        if metric.type == "function":
            key = _metric_key(index, "function")
            function = load_function(metric.function, key)  # type: ignore[arg-type]
            scores.update(_as_scores(function(list(predictions), list(references)), metric, key))
        else:
            scores[metric.metric_name] = BUILT_IN[metric.type](
                predictions, references, lambda text, metric=metric: answer(text, metric))
    return scores


def reference_problems(references: Sequence[str], origins: Sequence[str],
                       metrics: Sequence[GenerateMetricConfig]) -> list[str]:
    """References a metric cannot score (its `extract` does not match, or nothing is left after normalizing):
    a mistake in the pattern or the data, named before training rather than scored 0 every evaluation."""
    problems = []
    for index, metric in enumerate(metrics):
        if metric.type == "function":
            continue
        bad = [(origin, reference) for origin, reference in zip(origins, references) if not answer(reference, metric)]
        if bad:
            origin, reference = bad[0]
            what = f"extract {metric.extract!r} does not match" if metric.extract else "nothing is left after normalize"
            problems.append(
                f"{_metric_key(index, 'extract' if metric.extract else 'normalize')}: {what} the reference of {len(bad)} "
                f"of {len(references)} eval prompts, first {origin}: {reference[:120]!r}")
    return problems
