"""Running a call to completion in a short-lived thread of its own."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T], name: str = "asyncllm-passing") -> T:
    """Runs `fn` in a new thread, waits for it, and returns its result or raises its error here.
    Used where the calling thread must not run `fn` itself: a running event loop (sync bridges),
    or per-thread state `fn` would leave behind (OpenMP pools, see AsyncEngine.from_args)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
