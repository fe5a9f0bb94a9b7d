"""Values of `genserve-server serve` (and `health`) flags refused at parse time, naming the flag:
argparse's usage error, exit 2, before anything is loaded, bound or logged."""

from __future__ import annotations

import pytest

from genserve_server.main import build_parser

SERVE_PATH_FLAGS = (
    "--models",
    "--config",
    "--ready-file",
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--token-file",
    "--trt-engine-cache-dir",
)
HEALTH_PATH_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key", "--token-file")


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flag", SERVE_PATH_FLAGS)
def test_an_empty_path_flag_of_serve_is_a_usage_error_naming_it(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--models "$MODELS"` with the variable unset served the working directory as the model
    repository (Path("") is "."); an empty --trt-engine-cache-dir turned the engine cache off without
    a word, where the config file's "trt_engine_cache_dir": "" is refused; an empty --config,
    --token-file or TLS file was refused as ". is a directory", naming no flag."""
    argv = ["serve", "--models", "models", flag, ""]
    err = _usage_error(argv, capsys)
    assert f"argument {flag}: expected a path, got an empty value" in err, err


@pytest.mark.parametrize("flag", HEALTH_PATH_FLAGS)
def test_an_empty_path_flag_of_the_health_probe_is_a_usage_error_naming_it(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe read an empty --tls-ca or --token-file as ".", and answered unhealthy (exit 1, as for
    a server that is down) instead of a usage error."""
    err = _usage_error(["health", flag, ""], capsys)
    assert f"argument {flag}: expected a path, got an empty value" in err, err


@pytest.mark.parametrize("flag", ["--host", "--metrics-host"])
def test_an_empty_bind_address_is_a_usage_error_naming_it(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--metrics-host "$HOST"` with the variable unset bound /metrics on every interface (the default
    is 127.0.0.1): an empty address is refused; every interface is asked for by name."""
    err = _usage_error(["serve", "--models", "models", flag, ""], capsys)
    assert f"argument {flag}: expected an address (0.0.0.0 for every interface), got an empty value" in err, (
        err
    )
    args = build_parser().parse_args(["serve", "--models", "models", flag, "0.0.0.0"])
    assert getattr(args, flag[2:].replace("-", "_")) == "0.0.0.0"


def test_a_path_flag_keeps_its_value() -> None:
    args = build_parser().parse_args(
        ["serve", "--models", "models", "--config", "etc/server.json", "--trt-engine-cache-dir", "trt"]
    )
    assert str(args.models) == "models" and str(args.config) == "etc/server.json"
    assert args.trt_engine_cache_dir == "trt"  # a str, as the config file's trt_engine_cache_dir


@pytest.mark.parametrize("value", ["1e10", "1e300"])
def test_a_probe_timeout_past_what_grpc_takes_is_a_usage_error_naming_the_limit(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`health --timeout-s 1e10` was taken, and grpc's deadline (the time now plus the timeout, in
    nanoseconds) overflowed: a healthy server was reported `"" DEADLINE_EXCEEDED`, exit 1."""
    from genserve_server.flag_types import MAX_TIMEOUT_S

    err = _usage_error(["health", "--timeout-s", value], capsys)
    assert "argument --timeout-s:" in err and f"<= {MAX_TIMEOUT_S:g}" in err, err


def test_the_largest_probe_timeout_checks_a_serving_server() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from genserve_server import probe
    from genserve_server.flag_types import MAX_TIMEOUT_S

    args = build_parser().parse_args(["health", "--timeout-s", repr(MAX_TIMEOUT_S)])
    assert args.timeout_s == MAX_TIMEOUT_S
    with ThreadPoolExecutor(max_workers=2) as pool:
        server = grpc.server(pool)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            assert probe.check("127.0.0.1", port, timeout_s=args.timeout_s)[:2] == (0, "SERVING")
        finally:
            server.stop(None)
