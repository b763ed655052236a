"""Command line: parses arguments and calls the public functions; no logic of its own."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raysft.config import Config, ModelConfig, is_uri, load_config, with_absolute_paths
from raysft.labels import IGNORE_INDEX
from raysft.errors import USER_ERRORS, ConfigError, RunError, RunInterrupted

if TYPE_CHECKING:
    from raysft.tune.report import SweepResult


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="train config YAML")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=1e-4 (repeatable)",
    )


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose", action="store_true",
        help="also show what raysft quiets: Ray's and Ray Train's info lines (one per reported step), Ray Data's "
             "progress, transformers' progress bars and deprecation warnings (same as RAYSFT_VERBOSE=1)",
    )


def _load(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    return load_config(args.config, [*args.overrides, *(extra or [])])


def marked_example(input_ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """Decode an example with trained tokens wrapped in ⟦ ⟧, to check masking by eye."""
    parts, current, trained_run = [], [], None
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if trained != trained_run and current:
            text = tokenizer.decode(current)
            parts.append(f"⟦{text}⟧" if trained_run else text)
            current = []
        current.append(token)
        trained_run = trained
    if current:
        text = tokenizer.decode(current)
        parts.append(f"⟦{text}⟧" if trained_run else text)
    return "".join(parts)


def cmd_train(args: argparse.Namespace) -> None:
    from raysft.training.trainer import train

    result = train(_load(args, ["train.resume=true"] if args.resume else []))
    print(f"[raysft] done: adapter in {result.final_dir}; metrics in {result.output_dir / 'metrics.jsonl'}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from raysft.tune.config import load_sweep
    from raysft.tune.sweep import sweep

    result = sweep(load_sweep(args.config, args.overrides), resume=args.resume)
    _print_sweep_summary(result)
    if result.best is None:
        raise RunError(f"no trial of the sweep completed; each trial's error is in {result.sweep_dir / 'tune'}/<trial>/error.txt")


def cmd_report(args: argparse.Namespace) -> None:
    from raysft.tune.report import write_report

    # A sweep on object storage (base.scaling.storage_path/<name>) is read into a local copy, reported there.
    _print_sweep_summary(write_report(_from_storage(args.sweep_dir, "sweep_dir", ("sweep.yaml", "trials", "tune"))))


def _print_sweep_summary(result: SweepResult) -> None:
    print((result.sweep_dir / "results.csv").read_text(), end="")
    best = f"best: {result.best.name} -> {result.best_dir}" if result.best else "best: none (no trial completed)"
    print(f"[sweep] {best}; report in {result.sweep_dir / 'report.md'}")


def cmd_data(args: argparse.Namespace) -> None:
    from raysft.data.pipeline import first_examples, prepare_data, stats_json
    from raysft.model import load_tokenizer
    from raysft.track import stats_table

    cfg = with_absolute_paths(_load(args))
    prepared = prepare_data(cfg)
    print(stats_json(prepared.stats) if args.json else stats_table(prepared.stats.__dict__))
    if args.show:
        tokenizer = load_tokenizer(cfg.model)
        for example in first_examples(prepared.tokenized["train"], args.show):
            print(f"\n--- {example['origin']} (trained tokens in ⟦ ⟧) ---")
            print(marked_example(example["input_ids"], example["labels"], tokenizer))


def _from_storage(location: str, key: str, names: tuple[str, ...] = ()) -> str:
    """A run or adapter on object storage (s3://, gs://) downloaded to a local folder; a path as it is."""
    from raysft import storage

    if not is_uri(location):
        return location
    try:
        found = storage.exists(location)
    except (ValueError, OSError) as err:
        raise ConfigError([f"{key}: {location}: cannot read it ({' '.join(str(err).split())[:300]})"]) from None
    if not found:
        raise ConfigError([f"{key}: {location} does not exist (or the credentials in the environment cannot read it)"])
    return str(storage.local_copy(location, names))


def cmd_generate(args: argparse.Namespace) -> None:
    from raysft.infer import chat_generate, check_adapter, load_for_inference
    from raysft.model import check_model_source

    model_cfg = ModelConfig(name_or_path=args.model, gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code)
    adapter = _from_storage(args.adapter, "--adapter") if args.adapter is not None else None
    # The same checks load_for_inference makes, here so that the errors name the flags.
    problems = check_model_source(model_cfg, "--model")
    problems += check_adapter(adapter, "--adapter") if adapter is not None else []
    if problems:
        raise ConfigError(problems)
    model, tokenizer = load_for_inference(model_cfg, adapter)
    for prompt, answer in zip(args.prompt, chat_generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature)):
        print(f"> {prompt}\n{answer}\n")


def cmd_export(args: argparse.Namespace) -> None:
    from raysft.infer import merge_adapter

    run_dir = _from_storage(args.run_dir, "run_dir", ("config.yaml", "final"))
    print(f"[raysft] merged model written to {merge_adapter(run_dir, args.merge, overwrite=args.overwrite)}")


def cmd_plan(args: argparse.Namespace) -> None:
    from raysft.plan import plan_report

    print(plan_report(_load(args), args.gpu_mem, args.gpus, args.model_config))


def cmd_quickstart(args: argparse.Namespace) -> None:
    from raysft.quickstart import run_quickstart

    run_quickstart(Path(args.output_dir), args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysft", description="Supervised fine-tuning of LLMs on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model (LoRA, QLoRA or full)")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the newest verified checkpoint")
    _add_verbose(train)
    train.set_defaults(run=cmd_train)

    sweep = commands.add_parser("sweep", help="hyperparameter sweep on Ray Tune (one trial = one Ray Train run)")
    sweep.add_argument("config", help="sweep YAML (see sweeps/)")
    sweep.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a sweep field, e.g. --set num_samples=4 or --set base.train.max_steps=20 (repeatable)",
    )
    sweep.add_argument("--resume", action="store_true", help="continue a killed sweep (finished trials are not rerun)")
    _add_verbose(sweep)
    sweep.set_defaults(run=cmd_sweep)

    report = commands.add_parser("report", help="rewrite results.csv, best/ and report.png of a sweep folder")
    report.add_argument("sweep_dir", help="a sweep output_dir (the folder holding sweep.yaml), or the sweep on storage (s3://.../<name>)")
    report.set_defaults(run=cmd_report)

    data = commands.add_parser("data", help="dataset statistics and rendered examples with trained tokens marked")
    _add_config_args(data)
    data.add_argument("--show", type=int, default=3, help="examples to render")
    data.add_argument("--json", action="store_true",
                      help="the statistics as JSON (as data_stats.json holds them) instead of a table")
    _add_verbose(data)
    data.set_defaults(run=cmd_data)

    generate = commands.add_parser("generate", help="sample from a base model plus an optional adapter")
    generate.add_argument("--model", required=True, help="hub id, model folder, or .gguf path")
    generate.add_argument("--gguf-file", default=None)
    generate.add_argument("--adapter", default=None, help="PEFT adapter folder, e.g. RUN/final")
    generate.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--trust-remote-code", action="store_true")
    generate.set_defaults(run=cmd_generate)

    export = commands.add_parser("export", help="merge a run's adapter into its base model")
    export.add_argument("run_dir", help="a train output_dir")
    export.add_argument(
        "--merge", required=True, metavar="MERGED_DIR",
        help="where to write the merged model: a new or empty folder (never the run folder, inside it, or above it)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace MERGED_DIR if an earlier `raysft export` wrote it (and only then)"
    )
    export.set_defaults(run=cmd_export)

    plan = commands.add_parser("plan", help="per-GPU memory of a train config under ddp and fsdp (no weights loaded)")
    _add_config_args(plan)
    plan.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB, 24GB, 40G (default 80GiB)")
    plan.add_argument("--gpus", default="1,2,4,8", help="GPU counts to plan for, comma-separated (default 1,2,4,8)")
    plan.add_argument(
        "--model-config", default=None, metavar="PATH",
        help="the model's config.json (or its folder), for a hub id or a GGUF file the planner cannot read",
    )
    plan.set_defaults(run=cmd_plan)

    quickstart = commands.add_parser("quickstart", help="fine-tune SmolLM2-135M on a generated task, before/after")
    quickstart.add_argument("--output-dir", default="runs/quickstart")
    quickstart.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_verbose(quickstart)
    quickstart.set_defaults(run=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    from raysft.track import console_mode, verbose

    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "verbose"):  # the commands that run on Ray: its console is raysft's to set
            with console_mode(args.verbose or verbose()):
                args.run(args)
        else:
            args.run(args)
    except USER_ERRORS as err:
        print(f"raysft: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        return _stop(err, args)
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues the interrupted `raysft train` or `raysft sweep` of `args`."""
    sets = [word for override in args.overrides for word in ("--set", override)]
    return shlex.join(["raysft", args.command, args.config, *sets, "--resume"])


def _stop(err: RunInterrupted, args: argparse.Namespace) -> int:
    """One line (where the run stopped, the command that resumes it), this job's Ray actors gone (a local Ray
    that raysft started shut down), and 128 + the signal's number as the exit status (130 SIGINT, 143 SIGTERM)."""
    import ray

    ray.shutdown()
    print(f"raysft: {err}; resume with: {resume_command(args)}", file=sys.stderr, flush=True)
    code = 128 + (err.signum or signal.SIGINT)
    if not err.stopped:  # the run's thread may still be inside a Ray call; no interpreter teardown to crash it
        sys.stdout.flush()
        os._exit(code)
    return code

