"""The driver -> worker hand-off stays light, a Ray run's driver imports no model stack, and a worker imports only
the optional stacks its run uses."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys

from raysft.config import parse_config
from raysft.data.cache import CachedTable
from raysft.training.worker import LoopInputs
from tests.runs import REPO

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")


def _config(**model: object) -> dict[str, object]:
    return {"model": {"name_or_path": "owner/model", **model}, "data": {"train": [{"path": "x.jsonl"}]}}


def _run(code: str, payload: bytes) -> str:
    done = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, check=True)
    return done.stdout.decode().strip()


def test_unpickling_loop_inputs_imports_no_training_stack() -> None:
    # Ray Train's controller unpickles the train loop config; it must not pay for torch/transformers/peft.
    table = CachedTable("/tmp/cache/packed/abc", ["w-1/part.parquet"], [[64, 12]])
    inputs = LoopInputs(parse_config(_config()), "/tmp/run", "abc", 0, train_data=table)
    code = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert _run(code, pickle.dumps(inputs)) == "[]"


def test_bitsandbytes_stays_out_of_a_worker_that_does_not_quantize() -> None:
    code = ("import pickle, sys; from raysft.training.worker import hide_unused_bitsandbytes; "
            "cfg = pickle.loads(sys.stdin.buffer.read()); hidden = hide_unused_bitsandbytes(cfg); import peft; "
            "print(hidden, sys.modules.get('bitsandbytes') is not None)")
    plain = parse_config(_config())
    assert _run(code, pickle.dumps(plain)) == "True False"
    qlora = parse_config(_config(quantization="4bit"))
    assert _run(code, pickle.dumps(qlora)) == "False True"


def test_a_ray_runs_driver_imports_no_model_stack() -> None:
    # The driver of a Ray run (and every sweep trial's) loads a tokenizer and checks the model, nothing more: peft
    # (which imports bitsandbytes and torch._inductor) is the workers' alone, seconds of every run's start.
    code = ("import sys; import raysft.training.trainer, raysft.tune.sweep, raysft.tokenizer, raysft.model_source; "
            "print(sorted(m for m in ('peft', 'bitsandbytes', 'raysft.model') if m in sys.modules))")
    assert _run(code, b"") == "[]"


def _training_imports() -> dict[str, set[str]]:
    """Which raysft.training modules each one imports (inside functions too; not what only type checkers see)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "raysft" / "training").glob("*.py")):
        module = f"raysft.training.{path.stem}"
        tree = ast.parse(path.read_text())
        type_only = {id(node) for guard in ast.walk(tree) if isinstance(guard, ast.If)
                     and getattr(guard.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(guard)}
        graph[module] = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                         and id(node) not in type_only and (node.module or "").startswith("raysft.training.")}
    return graph


def test_the_training_modules_import_no_circle() -> None:
    graph, circles = _training_imports(), []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                circles.append(path[path.index(target):] + [target])
            else:
                visit(target, path + [target])

    for module in graph:
        visit(module, [module])
    assert not circles, circles
