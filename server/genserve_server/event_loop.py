"""Which asyncio event loop runs the server: uvloop where it is installed, else asyncio's own.

gRPC's asyncio stack runs on any asyncio loop. On tiny models the event loop is the bottleneck
(bench/profile.md: gRPC's per-call work and asyncio's scheduling are most of a request's CPU), and
uvloop's loop, written in Cython on libuv, does the scheduling part for less. `--event-loop asyncio`
keeps the standard loop (a platform without uvloop gets it anyway).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
CHOICES: tuple[EventLoopChoice, ...] = ("auto", "uvloop", "asyncio")


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: EventLoopChoice) -> Literal["uvloop", "asyncio"]:
    """The loop `choice` means here; "uvloop" where it is not installed is an error naming the flag."""
    if choice == "asyncio":
        return "asyncio"
    if uvloop_available():
        return "uvloop"
    if choice == "uvloop":
        raise ValueError("--event-loop uvloop: the uvloop package is not installed (pip install uvloop)")
    return "asyncio"


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice = "auto") -> T:
    """asyncio.run(main) on the loop `choice` resolves to."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def running_loop_name() -> str:
    """The loop this coroutine runs on, "uvloop" or "asyncio" (for the start-up log)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
