"""The Ray a command runs on: a cluster it joins (and says so), or a local Ray it starts on loopback only; what
reaches the console of Ray's own output (filtered unless verbose); the Ray environment knobs raysft sets.

Ray's own `ray.init()` joins `address`, else RAY_ADDRESS, else the cluster `ray start` last started on this
machine, and only then starts a local Ray; raysft keeps that order (`ray job submit` and `ray start` users rely
on it) but says in one console line which cluster it joined.

A local Ray is raysft's own, so it is started as nobody else can reach it:

- Every Ray process listens on 127.0.0.1. `ray.init(_node_ip_address="127.0.0.1")` is not enough in Ray 2.60:
  init turns a loopback address into the machine's own IP ("so that other nodes can reach it"), after which GCS,
  raylet, object manager and worker gRPC servers listen on all interfaces and the dashboard and runtime-env agents
  on the machine's IP. Ray keeps loopback only where it does not do clusters (macOS, Windows), a choice read from
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER; turned off while the local Ray starts, Ray's processes get 127.0.0.1 as the
  node's address, and its C++ servers then listen on loopback only.
- Its address is known to its own processes (RAY_ADDRESS, which Ray's processes inherit). Ray Train's controller
  and placement-group cleaner ask Ray's State API about actors without an address; the API then looks for
  `ray start`'s address file, else for running GCS processes, and with two local Rays on a machine (two runs at
  once) it raises "Found multiple active Ray instances", printed as a traceback in each run. The GCS port is
  chosen here (RAY_GCS_SERVER_PORT) so that RAY_ADDRESS can be set before Ray starts its processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator
from typing import Any

from raysft import storage
from raysft.console import CONSOLE_PREFIX, after_ray_import, hide_deprecations, say, set_progress_bars, verbose
from raysft.errors import RunError

LOOPBACK = "127.0.0.1"

# The local Ray this process started: (the RAY_ADDRESS naming it, the RAY_ADDRESS it replaced); None: none started.
_started: tuple[str, str | None] | None = None


def ensure_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS, or the cluster `ray start` started on this machine), saying so in one console
    line; else start a local Ray listening on loopback only. Reuse a running session.

    Ray's own logging is configured (its INFO lines: "Started a local Ray instance", the dashboard's address)
    only when verbose; either way the workers' output is forwarded here, through raysft's filter unless verbose.

    Example:
        >>> ensure_ray(None)  # no cluster around: a local Ray on 127.0.0.1  # doctest: +SKIP
    """
    import ray

    after_ray_import()
    if ray.is_initialized():
        return
    _forget_stopped_local_ray()
    joining, source = cluster_to_join(address)
    if joining is None:
        _start_local_ray()
    else:
        say(f"joining the Ray cluster at {joining} ({source})")
        # A cluster on loopback (another local Ray of this machine's) is joined from loopback too: Ray would
        # otherwise rewrite 127.0.0.1 into the machine's IP, where that cluster does not listen.
        on_loopback = _node_on_loopback() if _is_loopback(joining) else contextlib.nullcontext()
        try:
            with on_loopback:
                ray.init(address=joining, log_to_driver=True, configure_logging=verbose())
        except ConnectionError as err:
            raise RunError(f"{source}: cannot join the Ray cluster at {joining} ({err}); start it, fix the address, "
                           "or leave scaling.ray_address and RAY_ADDRESS unset to run on a local Ray") from None
    if not verbose():
        filter_worker_logs()


def cluster_to_join(address: str | None) -> tuple[str | None, str]:
    """(the cluster `ray.init(address)` would join, what named it), or (None, "") when it would start a local Ray.

    Example:
        >>> cluster_to_join("10.0.0.5:6379")  # doctest: +SKIP
        ('10.0.0.5:6379', 'scaling.ray_address')
    """
    from ray._private.services import canonicalize_bootstrap_address  # Ray's own choice, the one ray.init makes

    source = ("scaling.ray_address" if address else "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS")
              else "the cluster `ray start` started on this machine")
    given = address or os.environ.get("RAY_ADDRESS")
    if given and "://" in given:  # a Ray Client address (ray://...): ray.init connects through it as it is
        return given, source
    try:
        joined = canonicalize_bootstrap_address(address)
        if joined is not None and not joined.rpartition(":")[2].isdigit():
            raise ValueError("expected host:port")
    except (ConnectionError, ValueError) as err:
        raise RunError(f"{source}: {given!r} names no Ray cluster to join ({err}); give host:port of a running "
                       "cluster's head, or leave scaling.ray_address and RAY_ADDRESS unset to run on a local Ray"
                       ) from None
    if joined is None:
        return None, ""
    return (given if given and _is_loopback(given) else joined), source


def _is_loopback(address: str) -> bool:
    return address.rpartition(":")[0].strip("[]") in (LOOPBACK, "localhost", "::1")


def _start_local_ray() -> None:
    global _started
    import ray

    address, replaced = f"{LOOPBACK}:{_free_loopback_port()}", os.environ.get("RAY_ADDRESS")  # "local", or unset
    try:
        with _loopback_only(address):
            ray.init(address="local", dashboard_host=LOOPBACK, log_to_driver=True, configure_logging=verbose())
    except BaseException:
        _restore("RAY_ADDRESS", replaced)
        raise
    _started = (address, replaced)


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """While inside, each named environment variable set to its value (None: left as it is); restored after.
    Ray and Tune read some settings from the environment when a run starts (Tune's console engine, its SIGINT
    handler), so raysft sets them around its own runs only."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            _restore(name, value)


@contextlib.contextmanager
def _loopback_only(address: str) -> Iterator[None]:
    """While a local Ray starts: its node address 127.0.0.1, its GCS at `address`, RAY_ADDRESS naming it (kept
    afterwards, for the driver's own State API calls); see the module docstring for why each is needed."""
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ.update(RAY_GCS_SERVER_PORT=address.rsplit(":", 1)[1], RAY_ADDRESS=address)
    try:
        with _node_on_loopback():
            yield
    finally:
        _restore("RAY_GCS_SERVER_PORT", saved)


@contextlib.contextmanager
def _node_on_loopback() -> Iterator[None]:
    """While Ray starts or connects: this node's address is 127.0.0.1 (Ray's processes started meanwhile inherit it)."""
    from ray._private import ray_constants

    saved, cluster_mode = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: this process imported Ray before the variable was set
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        _restore("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", saved)


def _forget_stopped_local_ray() -> None:
    """A local Ray this process started and then shut down leaves its RAY_ADDRESS behind: not a cluster to join."""
    global _started
    if _started is not None and os.environ.get("RAY_ADDRESS") == _started[0]:
        _restore("RAY_ADDRESS", _started[1])
    _started = None


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


# --- Ray environment knobs ------------------------------------------------------------------------------------

# Ray Train's controller takes one `ray.train.report` per worker per poll, and a worker holds at most one unread
# (the next report blocks): with a report at every logged step, the poll interval is the shortest a logged step
# can take. Ray's default interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s) held every run to one step per 2 s, a
# 0.1 s GPU step included. At 0.1 s the cap is 10 logged steps/s (raise train.log_every beyond that), and the
# controller takes 1.7-2.3% of one core instead of 0.7-0.8% (measured, 1 worker; its steps ran no slower).
# A poll that waits past the interval is only a missed health check, awaited again at the next poll; a worker is
# declared dead by RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 minutes). Ray passes the variable from the process
# that builds the TorchTrainer (the driver, or a Tune trial's process) to the controller; a value the user set wins.
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = 0.1


def set_train_controller_env() -> None:
    """The Ray environment knobs a Ray Train controller reads when `fit()` starts it (call before fit)."""
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, str(HEALTH_CHECK_INTERVAL_S))


# --- Ray's output on raysft's console ------------------------------------------------------------------------


def quiet_worker(verbose_run: bool) -> None:
    """In a process that runs one run (or trial) and exits with it, a Ray Train worker: no progress bars, whose
    output is never a terminal there (HF_HUB_DISABLE_PROGRESS_BARS for the processes it starts), and unless
    `verbose_run`, no deprecation warnings and no "Reporting training result" line per report."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    set_progress_bars(False)
    if verbose_run:
        return
    hide_deprecations()
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
# Ray's notice of a transient hiccup it retries on its own (Ray Train's controller on a loaded machine: "Failed to
# send resource request ... If this only happens transiently during network partition or CPU being overloaded, it's
# safe to ignore this error"): its line stays, the traceback Ray logs under it is dropped unless verbose.
_TRANSIENT_RAY_NOTICE = "it's safe to ignore this error"


def _reported_by_driver(exception_line: str) -> bool:
    return exception_line.startswith("raysft.errors.") or (
        exception_line.startswith("OSError") and storage.is_transient_text(exception_line))


def without_reported_tracebacks(lines: list[str]) -> list[str]:
    """`lines` (one batch of a process's forwarded output) less each traceback Ray Train logs for an error the
    driver reports as one message (from Ray Train's line to the traceback's last exception line) and the traceback
    under a notice of Ray's that a transient error is safe to ignore (the notice kept)."""
    kept: list[str] = []
    index = 0
    while index < len(lines):
        if _TRANSIENT_RAY_NOTICE in lines[index] and index + 1 < len(lines) and lines[index + 1].startswith(
                "Traceback (most recent call last):"):
            end = next((i for i in range(index + 2, len(lines)) if _EXCEPTION_LINE.match(lines[i])), None)
            if end is not None:
                kept.append(lines[index])
                index = end + 1
                continue
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
