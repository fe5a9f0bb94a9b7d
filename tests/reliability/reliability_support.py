"""Support for the reliability tests: a small model repository (fast, slow and faulty generators),
test certificates made with the openssl CLI, raw gRPC calls and process probes (/proc)."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from server_support import (
    OPSET,
    TINY_LATENT,
    ServerProcess,
    generator_graph,
    slow_generator_graph,
    write_model,
)

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve_server.config import ServerConfig
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository


def as_unprivileged_user() -> list[str]:
    """A command prefix under which permissions bind (root reads a directory of mode 0000); [] when
    not root. Root without its capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), not another
    user: another uid could not read a checkout under a mode-0700 folder (a CI clone in mktemp -d)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run the server without root's capabilities")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


# Small limits, so each can be hit cheaply; every one of them is a server config field.
SHARED_LIMITS = {
    "max_receive_message_bytes": 1024 * 1024,
    "max_images_per_request": 32,
    "max_input_pixels": 64 * 64,
    "max_concurrent_sample_streams": 2,
    "max_concurrent_rpcs": 48,
}


# Channel options for a client that never reads its streams: without BDP probing grpc's flow-control
# window stays at HTTP/2's initial 64 KiB, which an unread stream fills at once. With it grpc grew each
# unread stream's window to ~4 MB, which a loaded server (pytest -n 2) took seconds to fill.
NO_BDP_PROBE = [("grpc.http2.bdp_probe", 0)]

SERVER_NAME = "genserve.test"
GEN_CARD = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
FAIL_AT_BATCH = 3
# A latent row holding a value above this fails the whole batch it is in (a poison row).
POISON_LATENT = 100.0


def failing_generator_graph(latent_dim: int, fail_at: int) -> onnx.ModelProto:
    """A generator whose graph fails inside ONNX Runtime when the batch has exactly `fail_at` rows or
    holds a latent value above POISON_LATENT.

    z2 = Reshape(z, [N + bad, Z]): the identity for a good batch, and a Reshape whose element count
    does not match (a real ORT kernel error, not an injected one) for a bad one.
    """
    rng = np.random.default_rng(7)
    c, h, w = 1, 8, 8
    nodes = [
        # N from the data, not from Shape(z), so no graph optimizer can rewrite the shape arithmetic.
        helper.make_node("Mul", ["z", "f_zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "f_one"], ["ones"]),
        helper.make_node("ReduceSum", ["ones"], ["n_times_z"], keepdims=0),
        helper.make_node("Div", ["n_times_z", "f_zdim"], ["n_f"]),
        helper.make_node("Equal", ["n_f", "f_fail_at"], ["wrong_size"]),
        helper.make_node("ReduceMax", ["z"], ["z_max"], keepdims=0),
        helper.make_node("Greater", ["z_max", "f_poison"], ["poisoned"]),
        helper.make_node("Or", ["wrong_size", "poisoned"], ["is_bad"]),
        helper.make_node("Cast", ["is_bad"], ["bump"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["n_f", "bump"], ["n2_f"]),
        helper.make_node("Cast", ["n2_f"], ["n2"], to=TensorProto.INT64),
        # Z computed too: with one computed dim, ORT's ReshapeFusion would turn it into -1.
        helper.make_node("Div", ["n_times_z", "n_f"], ["z_f"]),
        helper.make_node("Cast", ["z_f"], ["z_i"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["n2", "axes0"], ["n2_1d"]),
        helper.make_node("Unsqueeze", ["z_i", "axes0"], ["z_1d"]),
        helper.make_node("Concat", ["n2_1d", "z_1d"], ["target"], axis=0),
        helper.make_node("Reshape", ["z", "target"], ["z2"]),
        helper.make_node("MatMul", ["z2", "W"], ["hidden"]),
        helper.make_node("Tanh", ["hidden"], ["act"]),
        helper.make_node("Reshape", ["act", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "flaky",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", latent_dim])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", c, h, w])],
        [
            numpy_helper.from_array(np.array(0.0, np.float32), "f_zero"),
            numpy_helper.from_array(np.array(1.0, np.float32), "f_one"),
            numpy_helper.from_array(np.array(float(latent_dim), np.float32), "f_zdim"),
            numpy_helper.from_array(np.array(float(fail_at), np.float32), "f_fail_at"),
            numpy_helper.from_array(np.array(POISON_LATENT, np.float32), "f_poison"),
            numpy_helper.from_array(np.array([0], np.int64), "axes0"),
            numpy_helper.from_array(rng.normal(0, 0.5, (latent_dim, c * h * w)).astype(np.float32), "W"),
            numpy_helper.from_array(np.array([-1, c, h, w], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_gen(root: Path, name: str = "gen", *, version: str = "1", seed: int = 0, **config: object) -> Path:
    batching = {"max_batch_size": 16, "max_queue_delay_ms": 2.0, "max_queue_size": 256}
    return write_model(
        root,
        name,
        "generator",
        generator_graph(TINY_LATENT, 3, 8, 8, seed=seed),
        GEN_CARD,
        config={"batching": batching, **config},
        version=version,
    )


def write_slow(
    root: Path, name: str = "slow", *, iterations: int = 400, queue: int = 8, batch: int = 4
) -> Path:
    return write_model(
        root,
        name,
        "generator",
        slow_generator_graph(TINY_LATENT, iterations),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": batch, "max_queue_delay_ms": 1.0, "max_queue_size": queue}},
    )


def write_flaky(root: Path, name: str = "flaky") -> Path:
    return write_model(
        root,
        name,
        "generator",
        failing_generator_graph(TINY_LATENT, FAIL_AT_BATCH),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "max_queue_size": 64}},
    )


def copy_version_atomically(model_dir: Path, src_version: str, new_version: str, new_model_dir: Path) -> None:
    """Write aside, then rename into place: the server never sees a half-written version."""
    aside = model_dir / f".tmp-{new_version}"
    shutil.copytree(new_model_dir / src_version, aside)
    aside.rename(model_dir / new_version)


async def wait_on_loop(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """In process: poll `predicate` on the event loop (rescans and drains run meanwhile) until it
    holds; fails naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


async def loaded_repository(root: Path) -> tuple[Repository, Metrics]:
    """An in-process repository of `root`, scanned and loaded, with its metrics on (reload tests)."""
    metrics = Metrics()
    repo = Repository(root, ServerConfig(), metrics)
    repo.scan()
    await repo.load_all()
    return repo, metrics


def version_states(repo: Repository, model: str = "gen") -> dict[str, str]:
    """In process: each registered version of `model` and its state's name."""
    return {v: mv.state.name for v, mv in repo.models[model].versions.items()}


# ------------------------------------------------------------------------------ certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Path:
    """A CA, a server certificate for SERVER_NAME and 127.0.0.1, and a client certificate (EC P-256)."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=genserve reliability CA", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
        ("rogue", "extendedKeyUsage=clientAuth"),
    ):
        ca = "rogue-ca" if name == "rogue" else "ca"
        if name == "rogue":
            _openssl("req", "-x509", *ec, "-keyout", "rogue-ca.key", "-out", "rogue-ca.pem", "-days", "2",
                     "-subj", "/CN=somebody else", cwd=d)  # fmt: skip
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
                 cwd=d)  # fmt: skip
    return d


_DATED_CA_CONFIG = """[ca]
default_ca = dated
[dated]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any_cn
unique_subject = no
[any_cn]
commonName = supplied
"""


def dated_certificate(pki: Path, name: str, start: str, end: str, *, ca: str = "ca") -> Path:
    """A copy of make_pki's `name` certificate (same key and extensions, signed by `ca`) valid from
    `start` to `end` (openssl ca's YYYYMMDDHHMMSSZ; `openssl x509 -days` takes no past date), as
    `<name>.pem` in a folder of its own beside `pki`'s files. `name` "ca" re-signs the CA itself."""
    d = pki / (f"dated-{name}-{start}-{end}" + ("" if ca == "ca" else f"-by-{ca}"))
    d.mkdir(exist_ok=True)
    (d / "ca.cnf").write_text(_DATED_CA_CONFIG)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    csr, ext, signer = pki / f"{name}.csr", pki / f"{name}.ext", ()
    if name == "ca":
        csr, ext, signer = d / "self.csr", d / "self.ext", ("-selfsign",)
        _openssl("x509", "-x509toreq", "-in", str(pki / "ca.pem"), "-signkey", str(pki / "ca.key"),
                 "-out", csr.name, cwd=d)  # fmt: skip
        ext.write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n")
    out = d / f"{name}.pem"
    _openssl("ca", "-batch", "-config", "ca.cnf", *signer, "-cert", str(pki / f"{ca}.pem"), "-keyfile",
             str(pki / f"{ca}.key"), "-in", str(csr), "-out", out.name, "-startdate", start, "-enddate", end,
             "-extfile", str(ext), "-notext", cwd=d)  # fmt: skip
    return out


def chain_with_intermediate(pki: Path, start: str, end: str, *, leaf_end: str = "20980601000000Z") -> Path:
    """A server certificate chain file: make_pki's server certificate (its key, valid from 2020 to
    `leaf_end`) signed by an intermediate CA valid from `start` to `end`, itself signed by the CA;
    the leaf first, then the intermediate, as a --tls-cert file holds them."""
    if not (pki / "intermediate.key").exists():
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl("req", *ec, "-keyout", "intermediate.key", "-out", "intermediate.csr",
                 "-subj", "/CN=genserve reliability intermediate", cwd=pki)  # fmt: skip
        (pki / "intermediate.ext").write_text(
            "basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n"
        )
    intermediate = dated_certificate(pki, "intermediate", start, end)
    (pki / "intermediate.pem").write_bytes(intermediate.read_bytes())  # the signer of the leaf below
    leaf = dated_certificate(pki, "server", "20200101000000Z", leaf_end, ca="intermediate")
    chain = intermediate.parent / "server-chain.pem"
    chain.write_bytes(leaf.read_bytes() + intermediate.read_bytes())
    return chain


def secure_channel(target: str, pki: Path, *, client: str | None = None) -> grpc.Channel:
    key = (pki / f"{client}.key").read_bytes() if client else None
    cert = (pki / f"{client}.pem").read_bytes() if client else None
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), key, cert)
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)])


# ------------------------------------------------------------------------------ calls and probes


def health_status(
    channel: grpc.Channel, service: str = "", *, metadata: tuple[tuple[str, str], ...] = ()
) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10, metadata=metadata)
    return int(response.status)


def sample_ok(
    channel: grpc.Channel,
    model: str = "gen",
    *,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout_s: float = 10,
) -> pb.SampleResponse:
    stub = pb_grpc.GenerationServiceStub(channel)
    response: pb.SampleResponse = stub.Sample(
        pb.SampleRequest(model=model, count=1, base_seed=1), timeout=timeout_s, metadata=metadata
    )
    return response


def code_of(fn: Callable[[], object]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set so far (VmHWM): catches what was allocated and freed again."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far (user + system, all its threads): what it has computed,
    however busy the machine is."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class MetricSampler:
    """Scrapes one gauge from /metrics every `interval_s` on a thread; keeps the maximum seen."""

    def __init__(self, server: ServerProcess, name: str, interval_s: float = 0.1, **labels: str) -> None:
        self.server, self.name, self.labels, self.interval_s = server, name, labels, interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.server.metric(self.name, **self.labels))
            except OSError:
                pass  # a scrape that timed out under load: the next one counts
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MetricSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# ------------------------------------------------------------------------------ hostile images


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A ~100-byte, well-formed PNG whose header declares width x height RGB pixels (7.5 GB at 50k^2)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # the first rows only; a decoder would allocate the canvas first
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png_bytes(height: int, width: int, channels: int = 3, seed: int = 0) -> bytes:
    import cv2

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    return bytes(buf.tobytes())


def jpeg_bytes(height: int, width: int, seed: int = 0) -> bytes:
    import cv2

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", pixels)
    assert ok
    return bytes(buf.tobytes())
