"""The prompts and references of `eval.generate`, read from the tokenized eval split in the driver.

Why from the tokenized examples rather than the raw rows: they are already what training and eval loss see,
for every source kind (files, object storage, HF datasets, inline rows) and for a held-out `eval_fraction`
alike (a hash per row decides that, in raysft.data.pipeline), rendered with the run's chat template. The
prompt is an example's tokens up to its last trained span, i.e. the conversation up to the last assistant
turn with the template's generation prompt (the assistant header is never trained); the reference is that
span decoded. Re-reading and re-rendering the raw rows would repeat the reader, the format detection and the
template for the same result, and could drift from it. The price: with `data.train_on_inputs: true` every
token is trained and no prompt can be told apart, so that combination is refused in raysft/config/rules.py.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from raysft.config import Config
from raysft.data.cache import list_arrays
from raysft.data.pipeline import PreparedData, in_split
from raysft.errors import ConfigError, DataError
from raysft.evaluation import GenerationSet, reference_problems
from raysft.labels import IGNORE_INDEX

log = logging.getLogger(__name__)


def last_turn(input_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(prompt ids, reference ids) of one tokenized example: the ids before its last run of trained labels, and
    that run; None when nothing is trained or everything is (no prompt to answer).

    Example:
        >>> ids = np.array([1, 2, 3, 4, 5, 6])
        >>> [part.tolist() for part in last_turn(ids, np.array([-100, 2, -100, -100, 5, 6]))]
        [[1, 2, 3, 4], [5, 6]]
    """
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    if len(trained) == 0:
        return None
    end = int(trained[-1]) + 1
    untrained_before = np.flatnonzero(labels[:end] == IGNORE_INDEX)
    start = int(untrained_before[-1]) + 1 if len(untrained_before) else 0
    if start == 0:
        return None
    return input_ids[:start], input_ids[start:end]


def generation_set(cfg: Config, prepared: PreparedData, tokenizer: Any) -> GenerationSet:
    """The first `eval.generate.num_prompts` examples of the eval split, in data order, as prompts and references.

    Examples the length policy drops from the eval split (`over_length: drop`) are left out here too; a truncated
    one keeps its whole prompt (generation is not bound by `max_seq_len`). Raises a DataError when no eval example
    has a prompt (text-format rows), and a ConfigError naming the metric whose `extract` misses a reference.
    """
    generate = cfg.eval.generate
    assert generate is not None, "eval.generate is not set"
    plan = prepared.plans["eval"]
    table = prepared.tokenized[plan.source]
    prompts: list[tuple[int, ...]] = []
    references: list[str] = []
    origins: list[str] = []
    without_prompt = 0
    for group in table.iter_groups(["seq", "origin", "input_ids", "labels", "num_tokens", "error"]):
        keep = in_split(group, plan)
        if plan.over_length == "drop":
            keep &= group.column("num_tokens").to_numpy() <= plan.max_seq_len
        ids, offsets = list_arrays(group.column("input_ids"))
        labels, _ = list_arrays(group.column("labels"))
        for row in np.flatnonzero(keep):
            parts = last_turn(ids[offsets[row] : offsets[row + 1]], labels[offsets[row] : offsets[row + 1]])
            if parts is None:
                without_prompt += 1
                continue
            prompt, reference = parts
            prompts.append(tuple(int(token) for token in prompt))
            # The trained span ends with the end-of-turn token; special tokens are markup, not the answer.
            references.append(tokenizer.decode(reference.tolist(), skip_special_tokens=True).strip())
            origins.append(str(group.column("origin")[int(row)]))
            if len(prompts) == generate.num_prompts:
                break
        if len(prompts) == generate.num_prompts:
            break
    if not prompts:
        raise DataError("eval.generate: no eval example has a prompt before a trained assistant turn (text-format "
                        "rows have none: every token is trained); give data.eval as conversations or prompt/response")
    if without_prompt:
        log.warning("eval.generate: %d eval examples have no prompt before a trained turn and are not generated",
                    without_prompt)
    if len(prompts) < generate.num_prompts:
        log.warning("eval.generate: the eval split holds %d usable examples, fewer than num_prompts=%d",
                    len(prompts), generate.num_prompts)
    problems = reference_problems(references, origins, generate.metrics)
    if problems:
        raise ConfigError(problems)
    return GenerationSet(tuple(prompts), tuple(references), tuple(origins))
