"""grpc.health.v1 (asyncio) wiring: "" for the whole server and one key per model name.

The server key is SERVING once the repository has loaded (even if some models are not: those
have their own NOT_SERVING key), and NOT_SERVING from the first moment of shutdown.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

SERVER_KEY = ""


class HealthState:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._tasks: set[asyncio.Task[None]] = set()

    async def set(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.servicer.set(service, status)

    def set_soon(self, service: str, serving: bool) -> None:
        """For synchronous callers (repository listeners) on the event loop thread."""
        task = asyncio.get_running_loop().create_task(self.set(service, serving))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks)

    async def shutdown(self) -> None:
        """Every key NOT_SERVING; later `set` calls are ignored (grpc's graceful-shutdown flag)."""
        await self.flush()
        await self.servicer.enter_graceful_shutdown()
