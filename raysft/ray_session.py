"""The Ray a command runs on: a cluster it joins (and says so), or a local Ray it starts on loopback only.

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
import os
import socket
from collections.abc import Iterator

from raysft.errors import RunError
from raysft.track import after_ray_import, filter_worker_logs, say, verbose

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
