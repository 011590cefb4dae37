"""One way to time a call: the median of `time.perf_counter` over timed calls, after warm-up.

Exporters (`--int8 auto`, the manifest's batch-1 latency) and benchmarks time with it, so every
"p50" kerasft reports means the same thing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def call_seconds(
    call: Callable[..., object],
    *,
    warmup: int = 3,
    calls: int | None = None,
    seconds: float | None = None,
    min_calls: int = 5,
    max_calls: int | None = None,
    inputs: Callable[[], object] | None = None,
) -> list[float]:
    """Wall time of each timed `call()`, in seconds (see `median_ms` for the arguments).

    Args:
        max_calls: with `seconds`, stop after this many timed calls even if time is left.
        inputs: called before each call, untimed; its result is `call`'s one argument.

    Returns:
        One duration per timed call, in order.
    """
    if (calls is None) == (seconds is None):
        raise ValueError(f"Give calls or seconds, not both. Received: {calls=}, {seconds=}")
    if (calls is not None and calls < 1) or min_calls < 1:
        raise ValueError(f"calls and min_calls must be >= 1. Received: {calls=}, {min_calls=}")
    run = call if inputs is None else (lambda: call(inputs()))
    for _ in range(warmup):
        run()
    times: list[float] = []
    deadline = None if seconds is None else time.perf_counter() + seconds
    while (
        (len(times) < calls)
        if calls is not None
        else (
            (time.perf_counter() < deadline or len(times) < min_calls)
            and (max_calls is None or len(times) < max_calls)
        )
    ):
        args = () if inputs is None else (inputs(),)
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return times


def median_ms(call: Callable[[], object], **timing) -> float:
    """Median wall time of `call()` in milliseconds.

    Args:
        call: the work to time, called with no arguments.
        **timing: `call_seconds`'s options:
            warmup: untimed calls first (lazy initialisation, caches, compilation); default 3.
            calls: time exactly this many calls; or
            seconds: time calls until this much time has passed (at least `min_calls` of them,
                default 5).

    Returns:
        The median of the timed calls, in milliseconds.

    Raises:
        ValueError: neither or both of `calls` and `seconds`, or a count below 1.

    Example:
        >>> median_ms(lambda: sum(range(1000)), calls=20) > 0
        True
    """
    return statistics.median(call_seconds(call, **timing)) * 1e3
