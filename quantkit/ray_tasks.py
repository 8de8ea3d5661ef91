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
