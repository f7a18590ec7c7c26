"""Time spent in Fulcrum's own code, so that a benchmark can tell it from orchestration.

The stage functions under the task layer are wrapped with ``measured``. The wall time of a
run minus the measured time is what Prefect, the run bookkeeping that is not measured, and
waiting cost. Nested measured calls count once, in the outermost call.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import TypeVar

Function = TypeVar("Function", bound=Callable)

_lock = threading.Lock()
_totals: dict[str, float] = {}
_depth = threading.local()


def measured(function: Function) -> Function:
    """Wrap ``function`` so that its wall time adds to the totals under its qualified name."""
    name = f"{function.__module__}.{function.__qualname__}"

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        depth = getattr(_depth, "value", 0)
        _depth.value = depth + 1
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _depth.value = depth
            if depth == 0:
                elapsed = time.perf_counter() - started
                with _lock:
                    _totals[name] = _totals.get(name, 0.0) + elapsed

    return wrapper  # type: ignore[return-value]


def measured_seconds() -> dict[str, float]:
    """Return a copy of the time measured so far, by function name."""
    with _lock:
        return dict(_totals)


def reset_measured_seconds() -> None:
    """Forget the time measured so far."""
    with _lock:
        _totals.clear()
