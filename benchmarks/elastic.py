"""Elastic training (issue 26): what a resize costs.

Runs the scenario of tests/training/test_elastic.py --runs times: a real `ray start` head and a second node on this
machine (1 CPU each), an elastic run (`scaling.num_workers: {min: 1, max: 2}`, the tiny 2-layer model, checkpoints
every 5 steps), the second node killed once the checkpoint at step 10 exists (a spot instance reclaimed), and a new
node started once the run went on with one worker. Reported per run:

  loss -> step     seconds from the node's loss to the next optimizer step (on the worker left)
  return -> step   seconds from starting the new node to a step trained on two workers again
  seconds_lost     what the run recorded in metrics.jsonl for each resize: from the checkpoint it continued from to
                   the restart (the steps trained after that checkpoint are trained again)

The tiny model makes steps nearly free, so the numbers are Ray's and raysft's fixed costs of a resize (failure
detection, a new worker group, the model load, the restore); a real model adds its own load time to each.

    python benchmarks/elastic.py --runs 3 --out benchmarks/results/elastic.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.REPO))  # the scenario and the tiny model are the tests' own

from tests.tiny import make_model, make_tokenizer  # noqa: E402
from tests.training.test_elastic import ELASTIC, run_elastic  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--start-timeout-s", type=float, default=None,
                        help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for the run (Ray's default: 60)")
    parser.add_argument("--out", default=None, help="write results JSON here and the markdown table next to it (.md)")
    args = parser.parse_args(argv)
    info = C.machine_info()
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="raysft-elastic-") as tmp:
        work = Path(tmp)
        tokenizer = make_tokenizer(work / "tokenizer")
        model_dir = make_model("llama", work / "model", tokenizer)
        for index in range(args.runs):
            run_dir = work / f"run{index}"
            run_dir.mkdir()
            env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(args.start_timeout_s)} if args.start_timeout_s else None
            elastic = run_elastic(model_dir, run_dir, ELASTIC, env)
            lost = [r["seconds_lost"] for r in elastic.history if "resized_from" in r]
            results.append({"loss_to_step_s": elastic.loss_to_step_s, "return_to_step_s": elastic.return_to_step_s,
                            "seconds_lost": lost})
            rows.append([index + 1, elastic.loss_to_step_s, elastic.return_to_step_s, *lost])
            print(f"run {index + 1}: {results[-1]}", flush=True)
    medians = [statistics.median(r[k] for r in results) for k in ("loss_to_step_s", "return_to_step_s")]
    table = C.markdown_table(["run", "loss -> step (s)", "return -> step (s)", "seconds_lost 2->1", "seconds_lost 1->2"],
                             [*rows, ["median", *medians, None, None]])
    command = f"python benchmarks/elastic.py --runs {args.runs}" + (
        f" --start-timeout-s {args.start_timeout_s:g}" if args.start_timeout_s else "") + f" --out {args.out}"
    markdown = "\n\n".join(["## Elastic training: the cost of a resize", f"Command: `{command}`", table,
                              C.machine_markdown(info)])
    print(markdown)
    C.write_outputs(args.out, {"machine": info, "runs": results}, markdown)


if __name__ == "__main__":
    main()
