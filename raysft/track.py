"""Where metrics go: metrics.jsonl (always), console, TensorBoard, W&B and MLflow. Rank 0 only. Also the
console itself: raysft's own lines, the tables it prints, and what it quiets of Ray and transformers.

MLflow follows Ray's integration (ray.air.integrations.mlflow) where it fits: rank 0 logs, the experiment is
created when missing, the tracking URI and its credentials come from the environment, a trial's params are
its sampled values, artifacts are not uploaded unless asked. It uses an `MlflowClient` of its own rather
than `setup_mlflow`: that sets the process-wide tracking URI (in local mode the driver's) and opens a new
run on every call, where a resume and a Ray Train restart must continue the one recorded in the run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysft import storage
from raysft.config import Config, TrackingConfig, flatten, public_tree
from raysft.errors import RunError
from raysft.fileio import write_error

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MLFLOW_DIR = "mlflow"
"""In a run or sweep folder: the local MLflow store (mlflow.db, artifacts/), when it is the default."""
MLFLOW_RUN_FILE = "mlflow_run.json"
"""In a run or sweep folder: the id of its MLflow run, what a resume and a worker restart continue. Beside the
store, not in it: an object-storage run's store is a copy synced from rank 0's node, the id is written at once."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl ([] when there is none yet).

    A line that does not parse is what a crash or a full disk leaves while appending (a torn last
    line): it is dropped with a warning, never trusted and never fatal, so the run stays resumable.
    """
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            log.warning("%s:%d: dropping a partial or damaged metrics line (%.60r)", path, number, line)
            continue
        records.append(record)
    return records


class Tracker:
    """Fan one metrics dict out to every enabled sink. W&B runs offline when no API key is set.

    `output_dir` is where rank 0 writes (the run folder, or a scratch copy of one in object storage);
    `location` is the run folder itself (a path or a URI), where the MLflow run's id is recorded.
    """

    def __init__(self, cfg: Config, output_dir: Path, total_steps: int, location: str, start_step: int = 0):
        self.total_steps = total_steps
        self.console = cfg.tracking.console
        self.clock = StepClock(start_step)
        self.metrics_file = (output_dir / METRICS_FILE).open("a", buffering=1)
        self.tensorboard = None
        self.wandb_run = None
        self.mlflow: MlflowRun | None = None
        run_name = cfg.tracking.run_name or Path(cfg.train.output_dir).name
        if cfg.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if cfg.tracking.wandb:
            import wandb

            # The key is read by wandb from the environment; it never passes through raysft's config or logs.
            self.wandb_run = wandb.init(
                project=cfg.tracking.wandb_project,
                group=cfg.tracking.wandb_group,
                name=run_name,
                dir=str(output_dir),
                # An explicit WANDB_MODE wins; otherwise offline unless there is a key to sync with.
                mode=os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline"),
                config=public_tree(cfg),
                reinit="create_new",
            )
        if cfg.tracking.mlflow:
            # Found again through mlflow_run.json by a --resume and a Ray Train worker restart: one run, continued.
            self.mlflow = open_mlflow_run(cfg.tracking, location, output_dir / MLFLOW_DIR, run_name,
                                          params=flatten(public_tree(cfg)))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.record(metrics, step)
        trained = any(not name.startswith("eval_") for name in metrics)
        eta = self.clock.eta(step, self.total_steps) if trained else None
        if not trained:
            self.clock.evaluated(step)  # an evaluation before any step: its time is not a step's
        if self.console:
            if trained:
                say(step_line(step, self.total_steps, metrics, eta))
            if any(name.startswith("eval_") for name in metrics):
                say(eval_line(step, self.total_steps, metrics))

    def record(self, metrics: dict[str, float], step: int) -> None:
        """Write one record to metrics.jsonl and every tracker, without a console line (log() adds it for steps and
        evaluations; an event such as an elastic resize is said with log_text)."""
        try:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as err:  # a full disk: name the file, so the message says what to free
            raise write_error(Path(self.metrics_file.name), err) from err
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"{'eval' if name.startswith('eval_') else 'train'}/{name}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.mlflow is not None:
            self.mlflow.log(metrics, step)

    def log_text(self, text: str) -> None:
        if self.console:
            say(text)

    def close(self, mlflow_status: str = "FINISHED") -> None:
        """Flush and close every sink; the MLflow run ends as `mlflow_status` (KILLED: stopped by a sweep's scheduler)."""
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.mlflow is not None:
            self.mlflow.end(mlflow_status)


# --- the console ----------------------------------------------------------------------------------------------

CONSOLE_PREFIX = "[raysft] "
VERBOSE_ENV = "RAYSFT_VERBOSE"
"""Set to 1 (what `--verbose` does) to keep what raysft quiets by default: Ray's and Ray Train's info lines,
Ray Data's progress, transformers' progress bars and deprecation warnings."""


def verbose() -> bool:
    """Whether this process runs verbose (RAYSFT_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def say(text: str) -> None:
    """One line of raysft's own on the console (stderr: progress, beside the results a command prints on stdout).

    Written to the stream, not with print(): a Ray Train worker replaces print() with one that writes the
    line and also logs it to its console handler, so every printed line reached the driver twice.
    """
    sys.stderr.write(f"{CONSOLE_PREFIX}{text}\n")
    sys.stderr.flush()


def format_duration(seconds: float) -> str:
    """Seconds as a short duration.

    Example:
        >>> format_duration(5.2), format_duration(65), format_duration(7384)
        ('5s', '1m05s', '2h03m')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepClock:
    """Wall time per step since training (re)started, for the ETA: the average over every step so far, evaluations
    included (they recur), the model load and an evaluation before the first step not (they do not)."""

    def __init__(self, start_step: int) -> None:
        self.start_step, self.started = start_step, time.monotonic()

    def evaluated(self, step: int) -> None:
        if step == self.start_step:
            self.started = time.monotonic()

    def eta(self, step: int, total: int) -> float | None:
        done = step - self.start_step
        return (time.monotonic() - self.started) / done * max(total - step, 0) if done > 0 else None


# Shown in the step line in this order and form; the rest of a record (other than HIDDEN) follows as `name value`.
HIDDEN_METRICS = {"epoch", "skipped", "num_tokens", "trained_tokens", "tokens_per_s"}


def step_line(step: int, total: int, metrics: dict[str, float], eta_s: float | None) -> str:
    """The console line of one logged training step.

    Example:
        >>> step_line(3, 28, {"loss": 1.23456, "lr": 2e-4, "grad_norm": 0.5, "tokens_per_s": 1234.5}, 65.0)
        'step 3/28 (11%)  loss 1.235  lr 2.00e-04  grad_norm 0.5  tokens/s 1,234  eta 1m05s'
    """
    parts = [f"step {step}/{total} ({step / max(total, 1):.0%})"]
    if "loss" in metrics:
        parts.append(f"loss {_fmt(metrics['loss'])}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    parts += [f"{name} {_fmt(value)}" for name, value in metrics.items()
              if name not in HIDDEN_METRICS | {"loss", "lr"} and not name.startswith("eval_")]
    if "tokens_per_s" in metrics:
        parts.append(f"tokens/s {metrics['tokens_per_s']:,.0f}")
    parts.append(f"eta {format_duration(eta_s)}" if eta_s is not None else "eta ?")
    if metrics.get("skipped"):
        parts.append("(update skipped: non-finite gradients)")
    return "  ".join(parts)


def eval_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """The console line of one evaluation.

    Example:
        >>> eval_line(0, 28, {"eval_loss": 2.0712, "eval_ppl": 7.93})
        'eval at step 0/28  eval_loss 2.071  eval_ppl 7.93'
    """
    shown = "  ".join(f"{name} {_fmt(value)}" for name, value in metrics.items() if name.startswith("eval_"))
    return f"eval at step {step}/{total}  {shown}"


# What each DataStats count means, as the console and `raysft data` say it (another count shows as its key).
COUNT_LABELS = {
    "invalid_skipped": "skipped (invalid)",
    "over_length_dropped": "dropped (over length)",
    "truncated": "truncated",
    "no_trained_tokens": "dropped (no trained tokens)",
}


def split_line(info: dict[str, Any]) -> str:
    """One split's statistics (a DataStats column) on one line: rows in, what the length policy did, rows out.

    Example:
        >>> split_line({"rows_read": 48, "examples_kept": 44, "rows_after_packing": 12, "packing_efficiency": 0.971,
        ...             "counts": {"over_length_dropped": 4, "truncated": 0}})
        '48 rows read, 4 dropped (over length), 44 examples kept, 12 rows 97.1% full'
    """
    counts = [f"{count:,} {COUNT_LABELS.get(name, name)}" for name, count in info.get("counts", {}).items() if count]
    return ", ".join([f"{info['rows_read']:,} rows read", *counts, f"{info['examples_kept']:,} examples kept",
                      f"{info['rows_after_packing']:,} rows {info['packing_efficiency']:.1%} full"])


def stats_table(stats: dict[str, dict[str, Any]]) -> str:
    """DataStats (as data_stats.json holds it) as a table, one column per split.

    Example:
        >>> print(stats_table({"rows_read": {"train": 48}, "counts": {"train": {"truncated": 3}},
        ...                    "examples_kept": {"train": 48}, "token_length_percentiles": {"train": {"p50": 210}},
        ...                    "trained_token_fraction": {"train": 0.4123}, "rows_after_packing": {"train": 12},
        ...                    "packing_efficiency": {"train": 0.97}, "tokens_after_packing": {"train": 2980}}))
                                 train
        rows read                   48
          truncated                  3
        examples kept               48
        tokens per example, p50    210
        trained tokens           41.2%
        packed rows                 12
        packing efficiency       97.0%
        tokens after packing     2,980
    """
    splits = list(stats.get("rows_read", {}))
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, values: dict[str, Any], form: str = "{:,}") -> None:
        rows.append((label, [form.format(values[split]) if split in values else "-" for split in splits]))

    add("rows read", stats.get("rows_read", {}))
    count_names = list(dict.fromkeys(name for split in splits for name in stats.get("counts", {}).get(split, {})))
    for name in count_names:
        add(f"  {COUNT_LABELS.get(name, name)}", {split: stats["counts"][split].get(name, 0) for split in splits})
    add("examples kept", stats.get("examples_kept", {}))
    percentiles = stats.get("token_length_percentiles", {})
    for name in dict.fromkeys(name for split in splits for name in percentiles.get(split, {})):
        add(f"tokens per example, {name}",
            {split: percentiles[split][name] for split in splits if name in percentiles.get(split, {})})
    add("trained tokens", stats.get("trained_token_fraction", {}), "{:.1%}")
    add("packed rows", stats.get("rows_after_packing", {}))
    add("packing efficiency", stats.get("packing_efficiency", {}), "{:.1%}")
    add("tokens after packing", stats.get("tokens_after_packing", {}))
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(split), *(len(values[i]) for _, values in rows)) + 2 for i, split in enumerate(splits)]
    lines = [" " * label_width + "".join(split.rjust(width) for split, width in zip(splits, widths))]
    lines += [label.ljust(label_width) + "".join(value.rjust(width) for value, width in zip(values, widths))
              for label, values in rows]
    return "\n".join(line.rstrip() for line in lines)


def interactive() -> bool:
    """Whether both output streams are terminals: elsewhere (a file, a pipe, `ray job logs`) a progress bar's
    carriage returns pile up as one endless line, so no bars."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _set_progress_bars(on: bool) -> None:
    """transformers' and the Hugging Face hub's tqdm bars ("Loading weights", downloads) on or off in this process
    (a transformers imported later takes the hub's setting)."""
    import huggingface_hub.utils

    if on:
        huggingface_hub.utils.enable_progress_bars()
    else:
        huggingface_hub.utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging

        (transformers.utils.logging.enable_progress_bar if on else transformers.utils.logging.disable_progress_bar)()


def _progress_bars_on() -> bool:
    import huggingface_hub.utils

    if "transformers" in sys.modules:
        import transformers.utils.logging

        return transformers.utils.logging.is_progress_bar_enabled()
    return not huggingface_hub.utils.are_progress_bars_disabled()


def _hide_deprecations() -> None:
    """Deprecation notices of the libraries raysft calls (FutureWarning, DeprecationWarning, Ray's
    RayDeprecationWarning) concern raysft's code, which pins and tests those versions, not a user's run."""
    if "ray" in sys.modules:  # Ray adds its own filter for its deprecations when imported: ours go in front
        import ray.util.annotations  # noqa: F401
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


_quiet_console = False  # inside console_mode, not verbose


def after_ray_import() -> None:
    """Ray adds a filter of its own for its deprecation warnings when first imported, in front of raysft's: a
    quiet console puts its own back in front (ensure_ray calls this once Ray is imported)."""
    if _quiet_console:
        _hide_deprecations()


# Loggers whose notices say nothing a user of raysft can act on: bitsandbytes on CPUs without its optional
# `kernels` package ("Failed to load CPU gemm_4bit_forward"), which falls back to its own CPU code.
QUIET_LOGGERS = {"bitsandbytes": logging.ERROR}


@contextlib.contextmanager
def console_mode(verbose_run: bool) -> Iterator[None]:
    """The console of a raysft command, for as long as it runs (the previous settings come back after, so a
    command run in-process, as tests do, leaves nothing behind).

    Quiet (the default): transformers' progress bars, deprecation warnings, and the notices of QUIET_LOGGERS
    off here; Ray, Ray Train and Ray Data keep to warnings, in this process and the ones Ray starts
    (`train_log_level`, `quiet_worker`, `filter_worker_logs`, raysft.ray_session's `ensure_ray` and
    `quiet_data_context`). Verbose (`--verbose`, RAYSFT_VERBOSE=1): all of it as the libraries print it, except
    progress bars when the output is not a terminal.
    """
    names = (VERBOSE_ENV, "RAY_COLOR_PREFIX")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    bars_were_on = _progress_bars_on()
    os.environ[VERBOSE_ENV] = "1" if verbose_run else "0"
    if not interactive():
        # Ray colours each forwarded line's "(name pid=...)" prefix with escape codes, also into files and pipes.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    global _quiet_console
    try:
        with warnings.catch_warnings():
            if not verbose_run or not interactive():
                _set_progress_bars(False)
            if not verbose_run:
                _quiet_console = True
                _hide_deprecations()
                for name, level in QUIET_LOGGERS.items():
                    logging.getLogger(name).setLevel(level)
            yield
    finally:
        _quiet_console = False
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        _set_progress_bars(bars_were_on)


def quiet_worker(verbose_run: bool) -> None:
    """In a process that runs one run (or trial) and exits with it, a Ray Train worker: no progress bars, whose
    output is never a terminal there (HF_HUB_DISABLE_PROGRESS_BARS for the processes it starts), and unless
    `verbose_run`, no deprecation warnings and no "Reporting training result" line per report."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    _set_progress_bars(False)
    if verbose_run:
        return
    _hide_deprecations()
    try:
        # Ray Train 2.60 logs that line (INFO) to a logger named after its module's file, outside the `ray.train`
        # loggers that RunConfig's LoggingConfig levels (see train_log_level).
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_log_level() -> str:
    """Ray Train's console level (RunConfig's LoggingConfig): its INFO lines ("Reporting training result N:
    TrainingReport(...)" after every report, worker group start-up) only when verbose."""
    return "INFO" if verbose() else "WARNING"


# Lines of Ray's own processes that say nothing about the run, dropped from what reaches the console unless
# verbose. Ray Train's controller starts an actor with restarts and arguments in the object store
# (PreemptionWatcher), on which Ray core logs an error-level notice (ray-project/ray#53727) a user cannot act on.
# bitsandbytes, imported with peft by every process that unpickles raysft's training code, notes on CPUs without
# its optional `kernels` package that it uses its own CPU code instead. Arrow's C++ notes an upload stream it
# closes after a failed upload, whose error was raised already (and is reported once, by the driver).
HARMLESS_RAY_LINES = (
    "has constructor arguments in the object store and max_restarts > 0",
    "Failed to load CPU gemm_4bit_forward from kernels-community",
    "Error ignored when destroying file of type",
)


def filter_worker_logs() -> bool:
    """Route the worker output Ray forwards to this driver through raysft's filter: HARMLESS_RAY_LINES dropped,
    raysft's own lines printed as the driver prints them (without Ray's "(RayTrainWorker pid=...)" prefix),
    everything else as Ray prints it. True when installed.

    Ray 2.60 has no public hook for this; the handler Ray registers at ray.init ("ray_print_logs" on its
    stdstream dispatcher) is replaced by one that calls Ray's own printer. When those internals move, nothing
    is installed and the output is Ray's (tests/test_cli.py runs a worker and fails on the noise).
    """
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        print_batch = ray_worker.print_to_stdstream
        ray_prefix_off = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    except (ImportError, AttributeError):
        return False
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return False  # log_to_driver=False: nothing is forwarded

    def forward(data: dict[str, Any]) -> None:
        group: list[str] = []
        ours = False
        for line in without_reported_tracebacks(data.get("lines", [])):
            if any(text in line for text in HARMLESS_RAY_LINES):
                continue
            if line.startswith(CONSOLE_PREFIX) != ours and group:
                print_batch({**data, "lines": group}, ignore_prefix=ours or ray_prefix_off)
                group = []
            ours = line.startswith(CONSOLE_PREFIX)
            group.append(line)
        if group:
            print_batch({**data, "lines": group}, ignore_prefix=ours or ray_prefix_off)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", forward)  # the name Ray removes again at ray.shutdown
    return True


# Ray Train logs an error of the training function (workers) or of its control loop (controller) with its
# traceback; the driver then raises it again. Where the driver reports the error as one message (a raysft error,
# or object storage that stopped answering), that traceback is dropped from the console unless verbose.
_RAY_TRAIN_ERROR_LOGS = ("Error in training function", "Error in control loop iteration")
_EXCEPTION_LINE = re.compile(r"^[\w.]+(?:Error|Exception)\b")


def _reported_by_driver(exception_line: str) -> bool:
    return exception_line.startswith("raysft.errors.") or (
        exception_line.startswith("OSError") and storage.is_transient_text(exception_line))


def without_reported_tracebacks(lines: list[str]) -> list[str]:
    """`lines` (one batch of a process's forwarded output) less each traceback Ray Train logs for an error the
    driver reports as one message: from Ray Train's line to the traceback's last exception line."""
    kept: list[str] = []
    index = 0
    while index < len(lines):
        if any(marker in lines[index] for marker in _RAY_TRAIN_ERROR_LOGS):
            block_end = next((i for i in range(index + 1, len(lines))
                              if any(marker in lines[i] for marker in _RAY_TRAIN_ERROR_LOGS)), len(lines))
            last = max((i for i in range(index, block_end) if _EXCEPTION_LINE.match(lines[i])), default=None)
            if last is not None and _reported_by_driver(lines[last]):
                index = last + 1
                continue
        kept.append(lines[index])
        index += 1
    return kept


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def mlflow_store(tracking: TrackingConfig, default_dir: Path) -> tuple[str, Path | None]:
    """(tracking URI, local store folder): MLFLOW_TRACKING_URI when set (no local folder: the server keeps the
    artifacts), else a SQLite store, MLflow 3's default backend, in `tracking.mlflow_dir` or `default_dir`."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri, None
    from mlflow.utils.file_utils import path_to_local_sqlite_uri

    folder = Path(tracking.mlflow_dir).expanduser() if tracking.mlflow_dir else default_dir
    return path_to_local_sqlite_uri(str(folder / "mlflow.db")), folder


@dataclass(frozen=True)
class MlflowRun:
    """One MLflow run, written through its own client (never MLflow's process-wide active run)."""

    client: Any  # mlflow.MlflowClient
    run_id: str

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One metrics.jsonl record. A step redone after a resume or a restart is logged again (MLflow cannot
        remove a point): the latest value at each step is the one metrics.jsonl keeps."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=points, synchronous=True)

    def end(self, status: str) -> None:
        """FINISHED, KILLED or FAILED (a resume sets it RUNNING again)."""
        self.client.set_terminated(self.run_id, status)


def mlflow_client(tracking: TrackingConfig, default_dir: Path) -> tuple[Any, Path | None]:
    """A client of the store `mlflow_store` names, and its local folder (created) or None."""
    from mlflow import MlflowClient

    uri, folder = mlflow_store(tracking, default_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri), folder


def recorded_mlflow_run(location: str) -> str | None:
    """The MLflow run id recorded in the run (or sweep) folder `location`, if any."""
    record = storage.join(location, MLFLOW_RUN_FILE)
    return json.loads(storage.read_bytes(record))["run_id"] if storage.exists(record) else None


def open_mlflow_run(tracking: TrackingConfig, location: str, default_dir: Path, run_name: str,
                    params: dict[str, Any], tags: dict[str, str] | None = None) -> MlflowRun:
    """Continue the MLflow run recorded in `location` (set RUNNING again), or start one with `params` and
    `tags`, nested under `tracking.mlflow_parent_run_id`, and record its id there.

    A recorded run the store does not hold (another MLFLOW_TRACKING_URI than the run started with, a
    deleted run) is not an error: a new run starts, and the log says so.
    """
    client, folder = mlflow_client(tracking, default_dir)
    recorded = recorded_mlflow_run(location)
    if recorded is not None:
        if _live_run(client, recorded):
            client.update_run(recorded, status="RUNNING")
            return MlflowRun(client, recorded)
        log.warning("MLflow run %s (recorded in %s) is not in this store; starting a new one", recorded,
                    storage.join(location, MLFLOW_RUN_FILE))
    experiment_id = _experiment_id(client, tracking.mlflow_experiment, folder)
    all_tags = dict(tags or {})
    if tracking.mlflow_parent_run_id:
        all_tags["mlflow.parentRunId"] = tracking.mlflow_parent_run_id
    run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    _log_params(client, run_id, params)
    record = {"run_id": run_id, "experiment_id": experiment_id, "experiment": tracking.mlflow_experiment}
    storage.write_bytes(storage.join(location, MLFLOW_RUN_FILE), json.dumps(record, indent=2).encode())
    return MlflowRun(client, run_id)


def _live_run(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _experiment_id(client: Any, name: str, folder: Path | None) -> str:
    """The experiment `name`, created when missing; a local store keeps its artifacts in its own folder
    (MLflow's default would be ./mlruns in whatever directory the process runs in)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=(folder / "artifacts").as_uri() if folder else None)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)  # created meanwhile by a parallel trial
    if found.lifecycle_stage != "active":
        raise RunError(f"tracking.mlflow_experiment: MLflow experiment {name!r} is deleted; restore it (mlflow "
                       f"experiments restore --experiment-id {found.experiment_id}) or choose another name")
    return found.experiment_id


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    # As config.yaml spells them (true, null, [a, b]), cut to what MLflow stores.
    items = [Param(key, (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_VAL_LENGTH])
             for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
