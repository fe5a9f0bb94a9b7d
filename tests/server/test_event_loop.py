"""The server's event loop choice (event_loop.py): uvloop where installed, asyncio on request."""

from __future__ import annotations

import asyncio

import pytest

from genserve_server import event_loop


async def _loop_name() -> str:
    await asyncio.sleep(0)
    return event_loop.running_loop_name()


def test_asyncio_runs_on_the_standard_loop() -> None:
    assert event_loop.resolve("asyncio") == "asyncio"
    assert event_loop.run(_loop_name(), "asyncio") == "asyncio"


def test_auto_takes_uvloop_where_it_is_installed() -> None:
    expected = "uvloop" if event_loop.uvloop_available() else "asyncio"
    assert event_loop.resolve("auto") == expected
    assert event_loop.run(_loop_name(), "auto") == expected


def test_asking_for_uvloop_without_it_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop, "uvloop_available", lambda: False)
    assert event_loop.resolve("auto") == "asyncio"
    with pytest.raises(ValueError, match="--event-loop uvloop"):
        event_loop.resolve("uvloop")
