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
from raysft.starter import DEFAULT_MODEL, FORMATS, METHODS

if TYPE_CHECKING:
    from raysft.training.trainer import CheckedRun
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
    from raysft.training.trainer import check, train

    from raysft import storage

    cfg = with_absolute_paths(_load(args, ["train.resume=true"] if args.resume else []))
    if args.check:
        _print_check(check(cfg), args.gpu_mem)
        return
    result = train(cfg)
    run = cfg.scaling.storage_path
    if run is None or Path(run) == result.output_dir:
        print(f"[raysft] done: adapter in {result.final_dir}; metrics in {result.output_dir / 'metrics.jsonl'}")
    else:  # the run lives in storage; output_dir holds a copy
        print(f"[raysft] done: adapter in {storage.join(run, 'final')}; metrics in {storage.join(run, 'metrics.jsonl')} "
              f"(a copy of the run in {result.output_dir})")


def _print_check(checked: CheckedRun, gpu_mem: str) -> None:
    """`train --check`: what the run would train on and the memory it would need, once every check passed."""
    from raysft.plan import parse_size, plan_report
    from raysft.console import stats_table

    parse_size(gpu_mem, "--gpu-mem")  # a bad flag is the user's to fix, not a plan that could not be made
    cfg = checked.config
    print(stats_table(checked.prepared.stats.__dict__))
    workers = max(1, cfg.scaling.num_workers)
    try:
        plan = plan_report(cfg, gpu_mem, str(workers))
    except ConfigError as err:  # a model the planner cannot read is no reason to refuse the run
        plan = "memory plan not available: " + "; ".join(err.problems)
    print(f"\nmemory per GPU for {workers} worker(s) (raysft plan):\n{plan}")
    start = f"would resume from {checked.resume_from}" if checked.resume_from else f"would start in {cfg.train.output_dir}"
    print(f"\n[raysft] check passed: the run {start}; nothing was trained, and the run folder was not written")


def cmd_sweep(args: argparse.Namespace) -> None:
    from raysft.run_folder import TRIAL_ERROR_FILE, TUNE_DIR
    from raysft.tune.config import load_sweep
    from raysft.tune.sweep import sweep

    result = sweep(load_sweep(args.config, args.overrides), resume=args.resume)
    _print_sweep_summary(result)
    if result.best is None:
        raise RunError(f"no trial of the sweep completed; each trial's error is in "
                       f"{result.sweep_dir / TUNE_DIR}/<trial>/{TRIAL_ERROR_FILE}")


def cmd_report(args: argparse.Namespace) -> None:
    from raysft.run_folder import SWEEP_FILE, TRIALS_DIR, TUNE_DIR, local_copy
    from raysft.tune.report import write_report

    # A sweep on object storage (base.scaling.storage_path/<name>) is read into a local copy, reported there.
    _print_sweep_summary(write_report(local_copy(args.sweep_dir, "sweep_dir", (SWEEP_FILE, TRIALS_DIR, TUNE_DIR))))


def _print_sweep_summary(result: SweepResult) -> None:
    from raysft.run_folder import REPORT_PAGE, RESULTS_FILE

    print((result.sweep_dir / RESULTS_FILE).read_text(), end="")
    best = f"best: {result.best.name} -> {result.best_dir}" if result.best else "best: none (no trial completed)"
    print(f"[sweep] {best}; report in {result.sweep_dir / REPORT_PAGE}")


def cmd_data(args: argparse.Namespace) -> None:
    from raysft.data.pipeline import first_examples, prepare_data, stats_json
    from raysft.tokenizer import load_tokenizer
    from raysft.console import stats_table

    cfg = with_absolute_paths(_load(args))
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg, tokenizer)
    print(stats_json(prepared.stats) if args.json else stats_table(prepared.stats.__dict__))
    if args.show:
        for example in first_examples(prepared.tokenized["train"], args.show):
            print(f"\n--- {example['origin']} (trained tokens in ⟦ ⟧) ---")
            print(marked_example(example["input_ids"], example["labels"], tokenizer))


def _run_of_adapter(adapter: str) -> str | None:
    """The run folder an adapter was trained in (RUN for RUN/final), when it holds the run's config.yaml."""
    from raysft.run_folder import CONFIG_FILE, local_copy

    parent = adapter.rstrip("/").rsplit("/", 1)[0] if is_uri(adapter) else str(Path(adapter).parent)
    if is_uri(adapter):
        try:
            local = str(local_copy(parent, "--adapter", (CONFIG_FILE,)))
        except ConfigError:
            return None
        return local if (Path(local) / CONFIG_FILE).is_file() else None
    return parent if (Path(parent) / CONFIG_FILE).is_file() else None


def _generate_model(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    """The base model to generate with, and the flag to name in its errors: --model, else the adapter's run."""
    if args.model is not None:
        return ModelConfig(name_or_path=args.model, gguf_file=args.gguf_file,
                           trust_remote_code=args.trust_remote_code), "--model"
    run = _run_of_adapter(args.adapter) if args.adapter is not None else None
    if run is None:
        where = f"{args.adapter} is not inside a run folder (no config.yaml beside it)" if args.adapter else "no --adapter"
        raise ConfigError([f"--model: give the base model (hub id, model folder or .gguf path); {where} to read it from"])
    from raysft.infer import run_config

    trained = run_config(run).model
    return trained.model_copy(update={"gradient_checkpointing": False}), f"--model (read from {Path(run) / 'config.yaml'})"


def cmd_generate(args: argparse.Namespace) -> None:
    from raysft.infer import chat_generate, check_adapter, load_for_inference
    from raysft.model_source import check_model_source
    from raysft.run_folder import local_copy

    model_cfg, model_key = _generate_model(args)
    adapter = str(local_copy(args.adapter, "--adapter")) if args.adapter is not None else None
    # The same checks load_for_inference makes, here so that the errors name the flags.
    problems = check_model_source(model_cfg, model_key, "--trust-remote-code")
    problems += check_adapter(adapter, "--adapter") if adapter is not None else []
    if problems:
        raise ConfigError(problems)
    model, tokenizer = load_for_inference(model_cfg, adapter)
    for prompt, answer in zip(args.prompt, chat_generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature)):
        print(f"> {prompt}\n{answer}\n")


def cmd_export(args: argparse.Namespace) -> None:
    from raysft.infer import merge_adapter
    from raysft.run_folder import CONFIG_FILE, FINAL_DIR, local_copy

    if args.merge_to is not None and args.merge is not None:
        raise ConfigError(["--merge: give the folder once, with --merge-to (--merge is its old spelling)"])
    if args.merge is not None:
        print("raysft: --merge DIR is deprecated; use --merge-to DIR (same meaning)", file=sys.stderr)
    target = args.merge_to if args.merge_to is not None else args.merge
    if target is None:
        raise ConfigError(["--merge-to: give the folder to write the merged model to (new or empty)"])
    run_dir = local_copy(args.run_dir, "run_dir", (CONFIG_FILE, FINAL_DIR))
    print(f"[raysft] merged model written to {merge_adapter(run_dir, target, overwrite=args.overwrite)}")


def _sweep_base(path: str) -> str | None:
    """The base of a sweep file, as `raysft plan` should be given it; None when `path` is no sweep file."""
    from raysft.config import read_yaml

    raw = read_yaml(path)
    if not {"base", "space"} <= raw.keys():
        return None
    base = raw["base"]
    if isinstance(base, str):
        return os.path.normpath(Path(path).parent / base)
    return "(inline in the sweep file: copy its base: section into a train YAML)"


def cmd_plan(args: argparse.Namespace) -> None:
    from raysft.plan import plan_report

    base = _sweep_base(args.config)
    if base is not None:
        raise ConfigError([
            f"{args.config} is a sweep file, not a train config; plan the train config it sweeps, its base: "
            f"raysft plan {base} (add the sweep's base_overrides and the space's values you want with --set)"
        ])  # fmt: skip
    print(plan_report(_load(args), args.gpu_mem, args.gpus, args.model_config))


def cmd_schema(args: argparse.Namespace) -> None:
    import json

    from raysft.schema import json_schema, markdown_reference

    print(markdown_reference() if args.markdown else json.dumps(json_schema(args.kind), indent=2), end="" if args.markdown else "\n")


def cmd_init(args: argparse.Namespace) -> None:
    from raysft.starter import write_starter

    written = write_starter(Path(args.out), args.format, args.model, args.method, args.data)
    for path in written:
        print(f"[raysft] wrote {path}")
    print(f"[raysft] next: raysft train {args.out} --check   (then without --check to train)")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from raysft.quickstart import run_quickstart

    run_quickstart(Path(args.output_dir), args.overrides)


def cmd_submit(args: argparse.Namespace) -> None:
    from raysft.submit import follow, submit

    job = submit(args.config, args.overrides, sweep=args.sweep, address=args.address, data_to=args.data_to,
                 paths_on_cluster=args.paths_on_cluster, install_deps=args.install_deps, resume=args.resume,
                 submission_id=args.submission_id)
    for local, remote in job.uploads:
        print(f"[raysft] data: {local} -> {remote}")
    key = "base.scaling.use_gpu" if args.sweep else "scaling.use_gpu"
    print(f"[raysft] {key}: {str(job.use_gpu).lower()} ({job.gpu_reason})")
    print(f"[raysft] submitted {job.job_id} to {job.address}; outputs: {job.outputs}")
    where = f"--address {job.address} {job.job_id}"
    print(f"[raysft] follow: ray job logs -f {where}   status: ray job status {where}   stop: ray job stop {where}")
    if args.wait:
        status = follow(job.address, job.job_id)
        print(f"[raysft] {job.job_id}: {status}")
        if status != "SUCCEEDED":
            raise RunError(f"job {job.job_id} ended {status}; its logs: ray job logs {where}")


def add_submit_parser(commands: Any) -> None:
    submit = _command(commands, "submit", "run a train config (or --sweep) on a Ray cluster's job server",
                      "raysft submit examples/gsm8k_lora.yaml --address http://127.0.0.1:8265 --wait",
                      "raysft submit examples/gsm8k_lora.yaml --address http://HEAD:8265 --data-to s3://bucket/data",
                      "raysft submit --sweep sweeps/lora_rank_lr.yaml --address http://HEAD:8265")
    submit.add_argument("config", help="train config YAML, or a sweep YAML with --sweep")
    submit.add_argument("--sweep", action="store_true", help="CONFIG is a sweep YAML (see sweeps/)")
    submit.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, as for train (base.KEY=VALUE for a sweep's base); repeatable",
    )
    submit.add_argument("--address", default=None,
                        help="the cluster's job server, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    submit.add_argument(
        "--data-to", default=None, metavar="URI",
        help="upload local data files here (s3://bucket/prefix, gs://...); default: the run's scaling.storage_path",
    )
    submit.add_argument("--paths-on-cluster", action="store_true",
                        help="local paths exist on every node as they are (a shared volume): upload nothing")
    submit.add_argument("--install-deps", action="store_true",
                        help="install constraints.txt's pinned packages for the job (a cluster on stock Ray images)")
    submit.add_argument("--resume", action="store_true", help="continue the run (or sweep) from its storage")
    submit.add_argument("--submission-id", default=None, help="the job's id (default: raysft-<config name>-<random>)")
    submit.add_argument("--wait", action="store_true", help="print the job's logs until it ends; fail if it fails")
    submit.set_defaults(run=cmd_submit)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples (the epilog) kept as written; every option's default shown, unless it is unset or off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] or action.default is argparse.SUPPRESS
        if "%(default)" in text or not action.option_strings or unset:
            return text
        return f"{text} (default: %(default)s)"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _command(commands: Any, name: str, help: str, *examples: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                               epilog=_examples(*examples), formatter_class=_HelpFormatter)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    # Read from the installed metadata: importing torch or ray just to print a version would take seconds.
    deps = ", ".join(f"{name} {installed(name)}" for name in ("torch", "ray", "transformers", "peft"))
    return f"raysft {installed('raysft')} (Python {sys.version.split()[0]}; {deps})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysft", description="Supervised fine-tuning of LLMs on Ray.", formatter_class=_HelpFormatter,
        epilog=_examples("raysft quickstart", "raysft init --format messages --method qlora --out my.yaml",
                         "raysft train my.yaml --check", "raysft train my.yaml", "raysft COMMAND --help"),
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = _command(commands, "train", "fine-tune a model (LoRA, QLoRA or full)",
                     "raysft train examples/gsm8k_lora.yaml",
                     "raysft train examples/gsm8k_lora.yaml --set train.lr=1e-4 --set lora.r=32",
                     "raysft train examples/gsm8k_lora.yaml --check     # checks, data statistics, memory plan",
                     "raysft train examples/gsm8k_lora.yaml --resume")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the newest verified checkpoint")
    train.add_argument(
        "--check", action="store_true",
        help="run every check a run makes before training, print the data statistics and the memory plan, and "
             "stop: nothing is trained and the run folder is not written (reading the data starts a local Ray, "
             "and fills the data cache)",
    )
    train.add_argument("--gpu-mem", default="80GiB", help="with --check: memory per GPU for the plan, e.g. 24GB")
    _add_verbose(train)
    train.set_defaults(run=cmd_train)

    sweep = _command(commands, "sweep", "hyperparameter sweep on Ray Tune (one trial = one Ray Train run)",
                     "raysft sweep sweeps/lora_rank_lr.yaml",
                     "raysft sweep sweeps/lora_rank_lr.yaml --set num_samples=4 --set base.train.max_steps=20",
                     "raysft sweep sweeps/lora_rank_lr.yaml --resume")
    sweep.add_argument("config", help="sweep YAML (see sweeps/)")
    sweep.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a sweep field, e.g. --set num_samples=4 or --set base.train.max_steps=20 (repeatable)",
    )
    sweep.add_argument("--resume", action="store_true", help="continue a killed sweep (finished trials are not rerun)")
    _add_verbose(sweep)
    sweep.set_defaults(run=cmd_sweep)

    report = _command(commands, "report", "rewrite results.csv, best/ and report.png of a sweep folder (no Ray)",
                      "raysft report runs/sweeps/lora_rank_lr",
                      "raysft report s3://my-bucket/raysft/sweeps/lora_rank_lr")
    report.add_argument("sweep_dir", help="a sweep output_dir (the folder holding sweep.yaml), or the sweep on storage (s3://.../<name>)")
    report.set_defaults(run=cmd_report)

    data = _command(commands, "data", "dataset statistics and rendered examples with trained tokens marked",
                    "raysft data examples/gsm8k_lora.yaml --show 3      # trained tokens inside ⟦ ⟧",
                    "raysft data examples/gsm8k_lora.yaml --json --show 0 > stats.json")
    _add_config_args(data)
    data.add_argument("--show", type=int, default=3, help="examples to render")
    data.add_argument("--json", action="store_true",
                      help="the statistics as JSON (as data_stats.json holds them) instead of a table")
    _add_verbose(data)
    data.set_defaults(run=cmd_data)

    generate = _command(commands, "generate", "answer prompts with a base model plus an optional adapter",
                        "raysft generate --adapter runs/gsm8k-lora/final --prompt 'What is 7*8?'",
                        "raysft generate --model HuggingFaceTB/SmolLM2-135M-Instruct --prompt 'Hi' --temperature 0.7")
    generate.add_argument("--model", default=None,
                          help="hub id, model folder, or .gguf path; default with --adapter RUN/final: the base model "
                               "in RUN/config.yaml")
    generate.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's folder")
    generate.add_argument("--adapter", default=None, help="PEFT adapter folder, e.g. RUN/final (or s3://.../final)")
    generate.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt at most")
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0 decodes greedily (the most likely token each step); above 0, samples at this "
                               "temperature")
    generate.add_argument("--trust-remote-code", action="store_true",
                          help="run model code shipped with --model (only for authors you trust)")
    generate.set_defaults(run=cmd_generate)

    export = _command(commands, "export", "merge a run's adapter into its base model (a plain transformers model)",
                      "raysft export runs/gsm8k-lora --merge-to runs/gsm8k-merged",
                      "raysft export s3://my-bucket/runs/gsm8k-lora --merge-to runs/gsm8k-merged --overwrite")
    export.add_argument("run_dir", help="a train output_dir (or the run on storage, s3://...)")
    export.add_argument(
        "--merge-to", default=None, metavar="MERGED_DIR",
        help="where to write the merged model: a new or empty folder (never the run folder, inside it, or above it)",
    )
    export.add_argument("--merge", default=None, metavar="MERGED_DIR", help="deprecated spelling of --merge-to")
    export.add_argument(
        "--overwrite", action="store_true", help="replace MERGED_DIR if an earlier `raysft export` wrote it (and only then)"
    )
    export.set_defaults(run=cmd_export)

    plan = _command(commands, "plan", "per-GPU memory of a train config under ddp and fsdp (no weights loaded)",
                    "raysft plan examples/plan/llama3-8b-full.yaml --model-config examples/plan/llama3-8b-config.json",
                    "raysft plan my.yaml --gpu-mem 24GB --gpus 1,2 --set data.max_seq_len=4096")
    _add_config_args(plan)
    plan.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, with its unit: 80GiB, 24GB, 40G (G = GiB)")
    plan.add_argument("--gpus", default="1,2,4,8", help="GPU counts to plan for, comma-separated")
    plan.add_argument(
        "--model-config", default=None, metavar="PATH",
        help="the model's config.json (or its folder), for a hub id that is not in the local Hugging Face cache",
    )
    plan.set_defaults(run=cmd_plan)

    init = _command(commands, "init", "write a commented starter train config (and sample data to try it on)",
                    "raysft init --out my.yaml",
                    "raysft init --format messages --method qlora --data my_chats.jsonl --out my.yaml",
                    "raysft init --model ./my-model-folder --method full --out full.yaml")
    init.add_argument("--format", default="prompt_response", choices=FORMATS, help="the rows' format")
    init.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local model folder")
    init.add_argument("--method", default="lora", choices=METHODS, help="what is trained")
    init.add_argument("--data", default=None, metavar="PATH",
                      help="your training data; without it a small sample in the chosen format is written beside "
                           "the config")
    init.add_argument("--out", default="raysft.yaml", help="the config file to write (never overwritten)")
    init.set_defaults(run=cmd_init)

    schema = _command(commands, "schema", "print the JSON Schema of the config, for editor completion",
                      "raysft schema > raysft.schema.json     # then, atop a config:",
                      "                                       # yaml-language-server: $schema=./raysft.schema.json",
                      "raysft schema --kind sweep > raysft-sweep.schema.json",
                      "raysft schema --markdown > docs/config-reference.md")
    schema.add_argument("--kind", default="train", choices=("train", "sweep"), help="a train config or a sweep file")
    schema.add_argument("--markdown", action="store_true", help="the config reference page (Markdown) instead")
    schema.set_defaults(run=cmd_schema)

    quickstart = _command(commands, "quickstart", "fine-tune SmolLM2-135M on a generated task, before/after",
                          "raysft quickstart", "raysft quickstart --set train.lr=5e-4 --output-dir /tmp/qs")
    quickstart.add_argument("--output-dir", default="runs/quickstart", help="the run folder")
    quickstart.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config field (repeatable)")
    _add_verbose(quickstart)
    quickstart.set_defaults(run=cmd_quickstart)
    add_submit_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from raysft.console import console_mode, verbose

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

