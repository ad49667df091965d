"""A config that, while pinned, replaces an op's shipped tile table: ``Pinned.use(config)`` for
tests (small tiles that exercise multi-tile paths at small shapes) and tuning runs."""

from __future__ import annotations

import contextlib
from typing import Generic, Iterator, TypeVar

C = TypeVar("C")


class Pinned(Generic[C]):
    def __init__(self) -> None:
        self.config: C | None = None

    @contextlib.contextmanager
    def use(self, config: C) -> Iterator[None]:
        """Every launch inside the block uses ``config``; blocks nest, the previous pin returns."""
        previous, self.config = self.config, config
        try:
            yield
        finally:
            self.config = previous
