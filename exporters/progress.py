"""Progress of the exporters' long loops (calibration passes, GPTQ, the quantizer's passes and its sensitivity
search), reported through whatever bar the caller installs: `pipeline` installs its own (pipeline/progress.py:
stderr, only where a person watches), and with none installed the loops run silent. The exporters never import
the CLI; the CLI hands them its bar instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_factory: list[Callable] = []  # the installed bar factory: factory(total, desc, unit) -> a context with update(n)


def install(factory: Callable) -> None:
    """Report through `factory(total, desc, unit)`, a context manager whose value has update(n) and
    set_description_str(text) (tqdm's interface)."""
    _factory[:] = [factory]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, text: str) -> None:
        pass


@contextlib.contextmanager
def bar(total: int, desc: str, unit: str = "step") -> Iterator:
    if not _factory:
        yield _Silent()
        return
    with _factory[0](total, desc, unit) as b:
        yield b


def each(items: Iterable[T], desc: str, unit: str = "step", total: int | None = None,
         label: Callable[[T], str] | None = None) -> Iterator[T]:
    """`items`, one bar step each; `label(item)` names the step in progress."""
    items = list(items) if total is None else items
    with bar(len(items) if total is None else total, desc, unit) as b:
        for item in items:
            if label is not None:
                b.set_description_str(f"{desc}: {label(item)}")
            yield item
            b.update(1)
