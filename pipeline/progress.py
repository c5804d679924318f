"""Progress of long stages on stderr: what is being done, n of N, elapsed and ETA (tqdm).

Results go to stdout and stay there alone. Progress shows only where a person watches: it is off when stderr is
not a terminal (a log file, CI, a pipe) and under `pipeline --quiet`; PIPELINE_PROGRESS=1 forces it on.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
QUIET = {"on": False}  # set by `pipeline --quiet`


def enabled() -> bool:
    if QUIET["on"]:
        return False
    if os.environ.get("PIPELINE_PROGRESS") == "1":
        return True
    return sys.stderr.isatty()


def bar(total: int, desc: str, unit: str = "step"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(), leave=False,
                dynamic_ncols=True)


def each(items: Iterable[T], desc: str, total: int | None = None, unit: str = "step") -> Iterator[T]:
    """`items`, one bar step each."""
    items = list(items) if total is None else items
    with bar(len(items) if total is None else total, desc, unit) as b:
        for item in items:
            yield item
            b.update(1)


@contextlib.contextmanager
def phases(stage: str, names: list[str]) -> Iterator:
    """A bar over a stage's named phases: call the yielded function with each phase's name as it starts."""
    with bar(len(names), stage, unit="phase") as b:
        started = []

        def start(name: str) -> None:
            if started:
                b.update(1)
            started.append(name)
            b.set_description_str(f"{stage}: {name}")

        yield start
        if started:
            b.update(1)


def _hand_to_exporters() -> None:
    """The exporters' long loops (calibration passes, GPTQ, the sensitivity search) report through this bar."""
    from exporters import progress as exporters_progress

    exporters_progress.install(bar)


_hand_to_exporters()
