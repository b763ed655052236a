"""`eval.generate` on the Ray Train workers: greedy answers to the eval prompts, scored the same on every rank.

The prompts are cut into length-sorted batches once (a pure function of the prompts), and worker r generates
batches r, r + N, ...: with 1 or N workers the same batches are generated, padded alike, so the answers and the
scores do not depend on the worker count. Rank 0 gathers the answers, scores them (raysft.evaluation) and sends
the scores to every rank, so early stopping and checkpoint ranking decide alike everywhere.

Under DDP each worker generates its batches on its own full copy of the model. Under FSDP every forward gathers
sharded weights collectively, so every rank runs as many batches as the busiest one (a rank out of batches
generates batch 0 again and discards it) with transformers' `synced_gpus`, which keeps every rank stepping until
all are done.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from raysft.config import Config
from raysft.errors import RunError
from raysft.evaluation import GenerationSet, score_generations
from raysft.run_folder import GENERATIONS_FILE
from raysft.fileio import write_error
from raysft.infer import generate_batch, length_batches
from raysft.model import TokenLoss
from raysft.training.step import autocast


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class GenerationEval:
    """Generates and scores the answers to a run's `eval.generate` prompts; one instance per worker."""

    def __init__(self, examples: GenerationSet, cfg: Config, rank: int, world: int, device: torch.device,
                 sharded: bool, tokenizer: PreTrainedTokenizerBase):
        assert cfg.eval.generate is not None, "eval.generate is not set"
        self.examples, self.settings = examples, cfg.eval.generate
        self.precision, self.device = cfg.train.precision, device
        self.rank, self.world, self.sharded = rank, world, sharded
        self.tokenizer = tokenizer  # the worker's own, loaded once (raysft/training/worker.py)
        self.batches = length_batches([len(prompt) for prompt in examples.prompts], self.settings.batch_size)

    def _my_batches(self) -> list[list[int] | None]:
        mine: list[list[int] | None] = list(self.batches[self.rank :: self.world])
        if self.sharded:  # None: a stand-in batch, generated only to take part in the collectives
            mine += [None] * (math.ceil(len(self.batches) / self.world) - len(mine))
        return mine

    @torch.no_grad()
    def __call__(self, loss_module: TokenLoss) -> tuple[dict[str, float], list[str]]:
        """(scores, the same on every rank; every answer in eval order on rank 0, [] on the others)."""
        loss_module.eval()  # no dropout, no NEFTune noise
        answers: dict[int, str] = {}
        try:
            for batch in self._my_batches():
                indices = batch if batch is not None else self.batches[0]
                with autocast(self.precision, self.device):
                    texts = generate_batch(loss_module, self.tokenizer, [self.examples.prompts[i] for i in indices],
                                           self.settings.max_new_tokens, synced_gpus=self.sharded)
                if batch is not None:
                    answers.update(zip(batch, texts))
        finally:
            loss_module.train()
        gathered: list[Any] = [answers]
        if _distributed():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, answers)
        predictions: list[str] = []
        outcome: list[Any] = [None]
        if self.rank == 0:
            merged = {index: text for part in gathered for index, text in part.items()}
            predictions = [merged[index] for index in range(len(self.examples.prompts))]
            try:
                outcome = [score_generations(predictions, self.examples.references, self.settings.metrics)]
            except Exception as err:  # a user function's failure: every rank raises it, none waits forever
                outcome = [f"{type(err).__name__}: {err}" if not isinstance(err, RunError) else str(err)]
        if _distributed():
            dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], str):
            raise RunError(f"eval.generate: scoring the generated answers failed: {outcome[0]}")
        return outcome[0], predictions

    @functools.cached_property
    def prompt_texts(self) -> list[str]:
        """The prompts as text, for generations.jsonl: decoded once, written at every evaluation."""
        return [self.tokenizer.decode(list(prompt)) for prompt in self.examples.prompts]

    def write(self, folder: Path, step: int, predictions: list[str]) -> None:
        """Rank 0: append this evaluation's answers to generations.jsonl (one line per prompt, with its step)."""
        path = folder / GENERATIONS_FILE
        lines = [json.dumps({"step": step, "example": index, "origin": self.examples.origins[index],
                             "prompt": self.prompt_texts[index],
                             "reference": self.examples.references[index], "prediction": prediction},
                            ensure_ascii=False) + "\n"
                 for index, prediction in enumerate(predictions)]
        try:
            with path.open("a", encoding="utf-8") as handle:
                handle.writelines(lines)
        except OSError as err:
            raise write_error(path, err) from err
