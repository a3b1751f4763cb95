"""The shared multi-rank test harness: N local ranks on a free port, with deadlines (gloo on CPU;
NCCL where every rank has its own GPU, as runtime.default_backend picks).

    results = run_ranks(my_rank_fn, 2, arg1, arg2)

`my_rank_fn` must be a module-level function (spawned children import it). The
process group is up when it runs; `dist.get_rank()` says which rank it is. A rank
that raises fails the test with that rank's traceback; a hung rank is named and
killed after `timeout_s`. This is journey_dist.runtime.spawn, the same engine the
labs use, so tests run what users run.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

from journey_dist.runtime import RankFailure, spawn

__all__ = ["RankFailure", "run_ranks"]


def run_ranks(fn, world_size: int, *args: Any, timeout_s: float = 120.0,
              collective_timeout_s: float = 60.0, hang_timeout_s: float | None = None,
              failure_grace_s: float = 3.0) -> list[Any]:
    """Run fn(*args) on `world_size` ranks; return the per-rank results in rank order.

    After a rank fails, the others get `failure_grace_s` to report their own errors. A rank
    frozen for `hang_timeout_s` (default: $JOURNEY_HANG_TIMEOUT or 30) is named by the heartbeat.
    Inside the ranks, as in the test process (pyproject.toml), a deprecated call in journey_dist
    is an error."""
    return spawn(partial(_strict_warnings, fn), world_size, args, timeout_s=timeout_s,
                 collective_timeout_s=collective_timeout_s, hang_timeout_s=hang_timeout_s,
                 failure_grace_s=failure_grace_s)


def _strict_warnings(fn, *args: Any) -> Any:
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("error", category=category, module="journey_dist")
    return fn(*args)
