"""`genserve-server health`: a tiny grpc.health.v1 probe for Docker HEALTHCHECK and humans.

Exit status 0 when the server answers SERVING for the service (`""`, the whole server, by default;
a model name for one model), 1 for any other answer, 2 when the server cannot be reached in time.
It imports no onnxruntime and no numpy, so a probe costs a Python start and one RPC.

Kubernetes does not need it: its probes speak grpc.health.v1 natively (deploy/k8s/).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_UNREACHABLE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `health` subcommand's options (main.py adds them to its subparser)."""
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051)")
    parser.add_argument(
        "--service", default="", help='health service name: "" for the whole server (default), or a model'
    )
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check (default 3 s)")


def check(host: str, port: int, service: str = "", timeout_s: float = 3.0) -> tuple[int, str]:
    """One Health.Check; returns (exit status, the status name or the gRPC error)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            name = code.name if code is not None else "UNKNOWN"
            # NOT_FOUND: the server is up but does not know this service name.
            status = EXIT_NOT_SERVING if code == grpc.StatusCode.NOT_FOUND else EXIT_UNREACHABLE
            return status, name
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    return (EXIT_SERVING if serving else EXIT_NOT_SERVING), name


def run(args: argparse.Namespace) -> int:
    """Run the probe for parsed arguments and write one line: `<service or ""> <status>`."""
    status, name = check(args.host, args.port, args.service, args.timeout_s)
    shown = args.service or '""'
    sys.stdout.write(f"{shown} {name}\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m genserve_server.probe --port 50051`."""
    parser = argparse.ArgumentParser(prog="genserve-server health", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
