"""grpc.health.v1 (asyncio) wiring: "" for the whole server, one key per model name.

The whole server ("" and its alias `genserve.v1.GenerationService`, the name probes that check a
service try) is SERVING only once start-up loading has finished and every *required* model has a
READY version: the models named by `--require-models`, or by default every model in the
repository. A model's key, and what "" counts, is SERVING only while the models its calls go
through serve too (a style generator's mapping, a code prior's decoder: main.py `_serves`). An
empty repository, or one whose models all failed, is NOT_SERVING: a pod that can answer nothing
must not receive traffic. From the first moment of shutdown every key is NOT_SERVING. `/healthz`
on the metrics port answers from the same state (`HealthState.serving`).

`liveness` is SERVING once start-up loading has finished, whatever the models did, until shutdown:
what Kubernetes' startup and liveness probes check, so that a model that failed to load takes the
pod out of the Service (readiness, "") without a restart loop (liveness).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from genserve_server.boundary import echo_request_id
from genserve_server.errors import clip_message

logger = logging.getLogger(__name__)

SERVER_KEY = ""
# The genserve.v1 service's full name (main.py checks it against the proto): a probe configured with
# the service's name gets the whole server's answer.
SERVICE_ALIAS = "genserve.v1.GenerationService"
OVERALL_KEYS = (SERVER_KEY, SERVICE_ALIAS)
LIVE_KEY = "liveness"


def overall_status(
    models: Mapping[str, bool], required: Sequence[str] | None, why: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """(serving?, why not) for the whole server, from whether each model serves; `why`: the reason
    of a model that does not serve though it has a READY version (its mapping or decoder cannot).

    >>> overall_status({"a": True, "b": False}, None)
    (False, 'required models not ready: b')
    >>> overall_status({"a": False, "b": False}, None, {"a": "every request fails: ..."})
    (False, 'required models not ready: a (every request fails: ...), b')
    >>> overall_status({"a": True, "b": False}, ["a"])
    (True, '')
    >>> overall_status({}, None)
    (False, 'no models in the repository')
    """
    names = list(models) if required is None else list(required)
    if not names:
        return False, "no models in the repository"
    missing = [n for n in names if n not in models]
    if missing:
        return False, f"required models not in the repository: {', '.join(missing)}"
    not_ready = [f"{n} ({why[n]})" if why and why.get(n) else n for n in names if not models[n]]
    if not_ready:
        return False, f"required models not ready: {', '.join(not_ready)}"
    return True, ""


def unknown_service(service: str) -> str:
    """Check's NOT_FOUND details: the name asked for (a repr: no control character; a long one
    clipped, not copied whole: a request may hold megabytes) and the names there are.

    >>> unknown_service("tiny_gen").partition(":")[0]
    "health service 'tiny_gen' not found"
    >>> unknown_service("c" * 300).partition(":")[0][-40:]
    "cccccccccc'...(300 characters) not found"
    """
    shown = repr(service[:256]) + (f"...({len(service)} characters)" if len(service) > 256 else "")
    return clip_message(
        f"health service {shown} not found: the names are '', {SERVICE_ALIAS}, {LIVE_KEY} and each "
        "model's name (health List lists them)"
    )


# List answers RESOURCE_EXHAUSTED beyond this many services (grpc.health.v1 allows it; grpc-go's own
# servicer stops at 100): a repository of thousands of models is listed by ListModels.
MAX_LISTED_SERVICES = 1000


class ListingHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer, with List: its own answers UNIMPLEMENTED ("Unexpected
    NotImplementedError"), though grpc.health.v1 defines it (a snapshot of Check's answers).

    Check, Watch and List answer from statuses this class records itself, in `set`, `clear` and
    `enter_graceful_shutdown`, not from the base class's private store, whose name no release
    promises and which has no way to forget a name (`clear`: a removed model's key, main.py). So
    List and Check agree: after shutdown every service is NOT_SERVING and later `set` and `clear`
    calls change nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        # Names mangled (`__`): no name the base class may take one day is ours to overwrite.
        # The base class starts with the whole server SERVING, as Check answers before any set.
        self.__statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus] = {
            health.OVERALL_HEALTH: health_pb2.HealthCheckResponse.SERVING
        }
        self.__shutting_down = False
        # Notified whenever a status may have changed: what Watch waits on.
        self.__changed = asyncio.Condition()

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        if self.__shutting_down:
            return
        self.__statuses[service] = status
        await self.__notify()

    async def clear(self, service: str) -> None:
        """Forget `service`: Check answers NOT_FOUND and List leaves it out, as for a name never set;
        its watchers are sent SERVICE_UNKNOWN (grpc.health.v1's answer for an unknown name, the call
        left open: a later `set` of the name is sent too)."""
        if self.__shutting_down:
            return
        self.__statuses.pop(service, None)
        await self.__notify()

    async def enter_graceful_shutdown(self) -> None:
        if not self.__shutting_down:
            self.__shutting_down = True
            self.__statuses = dict.fromkeys(self.__statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()
        await self.__notify()

    async def __notify(self) -> None:
        async with self.__changed:
            self.__changed.notify_all()

    async def Check(  # noqa: N802 - the grpc.health.v1 method's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        """The base class's Check, from the statuses recorded here, its request id in the trailing
        metadata (docs/metrics.md: every RPC's), also on its NOT_FOUND (grpc's abort without
        trailing metadata keeps what was set), whose details name the service (`unknown_service`)."""
        echo_request_id(context)
        status = self.__statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown_service(request.service))
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802 - the grpc.health.v1 method's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """The base class's Watch, except at shutdown: a watch never ends by itself, so the server's
        drain (`server.stop(grace)`) would wait the whole grace for it with nothing else in flight.
        Once shutting down it sends NOT_SERVING (a status it has not sent yet) and ends with
        UNAVAILABLE, as a SampleStream does. The statuses are written outside the condition: a
        watcher that reads slowly delays no `set`. Its request id comes back when it ends."""
        echo_request_id(context)
        last: health_pb2.HealthCheckResponse.ServingStatus | None = None
        while True:
            async with self.__changed:
                while (status := self.__watched(request.service)) == last and not self.__shutting_down:
                    await self.__changed.wait()
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self.__shutting_down and self.__watched(request.service) == last:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details("server is shutting down: health watch ended (NOT_SERVING sent)")
                return

    def __watched(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        """What a Watch sends: the status, and at shutdown NOT_SERVING for every name, one the
        server does not know included (docs/server.md: each open Watch is sent NOT_SERVING)."""
        if self.__shutting_down:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return self.__statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        echo_request_id(context)  # also on the RESOURCE_EXHAUSTED below (grpc keeps what was set)
        statuses = dict(self.__statuses)
        if len(statuses) > MAX_LISTED_SERVICES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(statuses)} health services, more than List answers ({MAX_LISTED_SERVICES}); "
                "use Check per service, or ListModels",
            )
        return health_pb2.HealthListResponse(
            statuses={k: health_pb2.HealthCheckResponse(status=v) for k, v in statuses.items()}
        )


class HealthState:
    def __init__(self) -> None:
        self.servicer = ListingHealthServicer()
        self._tasks: set[asyncio.Task[None]] = set()
        # The whole server's state, read by /healthz (another thread: a bool and a str, set whole).
        self.serving = False
        self.reason = "starting"
        self._closed = False
        self._closing: asyncio.Task[None] | None = None

    async def set(self, service: str, serving: bool) -> None:
        if self._closed:  # shutting down: every name stays NOT_SERVING
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.servicer.set(service, status)

    def set_soon(self, service: str, serving: bool) -> None:
        """For synchronous callers (repository listeners) on the event loop thread."""
        task = asyncio.get_running_loop().create_task(self.set(service, serving))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def clear_soon(self, service: str) -> None:
        """`service` forgotten (ListingHealthServicer.clear), after the sets already scheduled.
        Ignored once a stop was requested, as `set` is: shutdown's flush would run it before the
        servicer's own shutdown flag is up, and the key would vanish instead of staying NOT_SERVING."""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self.servicer.clear(service))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def set_overall_soon(self, serving: bool, reason: str = "") -> None:
        """The whole server's answer ("" and its alias); logs each change once."""
        if self._closed:
            return
        if (serving, reason) != (self.serving, self.reason):
            if serving:
                logger.info("server SERVING")
            else:
                logger.warning("server NOT_SERVING: %s", reason)
        self.serving, self.reason = serving, reason
        for key in OVERALL_KEYS:
            self.set_soon(key, serving)

    async def flush(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks)

    def shutdown_soon(self) -> None:
        """`shutdown` for a synchronous caller on the event loop thread (a stop requested, also
        during start-up, whose loads end before the drain begins): NOT_SERVING from now on."""
        if self._closed:
            return
        self._closed = True
        self.serving, self.reason = False, "shutting down"
        self._closing = asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self) -> None:
        """Every key NOT_SERVING; later `set` calls are ignored (grpc's graceful-shutdown flag)."""
        self._closed = True
        self.serving, self.reason = False, "shutting down"
        await self.flush()
        await self.servicer.enter_graceful_shutdown()
