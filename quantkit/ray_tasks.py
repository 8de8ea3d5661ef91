"""What every ``--ray`` command shares: importing Ray lazily with one clear error naming the
extra, and connecting to (or starting) Ray for the length of a command.

Ray is an optional extra (``pip install 'quantkit[ray]'``): nothing here imports it at module
level, so ``import quantkit`` and the CLI start without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantkit.errors import MissingDependencyError, QuantkitError

DEFAULT_MAX_RETRIES = 2  # times Ray retries a task whose worker or node died
# test hook: a path; the first task to see it missing creates it and kills its own worker
# process, as a crashed or preempted worker would (Ray then retries the task elsewhere)
KILL_ENV = "QUANTKIT_TEST_KILL_WORKER"


def die_once_if_asked() -> None:
    """The test hook (``KILL_ENV``): the first task that finds the marker missing kills its
    worker process; the others, and Ray's retry, go on."""
    import os

    marker = os.environ.get(KILL_ENV)
    if not marker:
        return
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        return
    os._exit(1)


def hook_env() -> dict[str, Any]:
    """Task options that carry the test hook to workers started before it was set."""
    import os

    return ({"runtime_env": {"env_vars": {KILL_ENV: os.environ[KILL_ENV]}}}
            if os.environ.get(KILL_ENV) else {})


def import_ray() -> Any:
    """``ray``, or one clear error naming the extra (nothing is written before this check)."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", "ray") from None
    return ray


@contextmanager
def ray_session(ray: Any, address: str, init_kwargs: dict[str, Any] | None) -> Iterator[None]:
    """Connect to (or start) Ray and shut it down after, unless the caller had already
    initialised it (a test, or a command that runs inside a Ray task). ``address`` is Ray's:
    "auto" (the running cluster), "local" (start one here) or a cluster address. A cluster that
    cannot be reached is one QuantkitError."""
    import quantkit

    if ray.is_initialized():
        yield
        return
    # ship this quantkit with the tasks, so workers run the driver's code rather than another
    # installed copy of quantkit
    runtime_env = {"py_modules": [str(Path(quantkit.__file__).parent)]}
    try:
        ray.init(address=address, runtime_env=runtime_env, **(init_kwargs or {}))
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise QuantkitError(f"could not connect to Ray at '{address}': {exc}",
                            "start a cluster with 'ray start --head', or pass --ray local "
                            "to start Ray on this machine") from None
    try:
        yield
    finally:
        ray.shutdown()
