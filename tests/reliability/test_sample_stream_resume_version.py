"""The client library's sample_stream reopens a broken stream at the index after the last image it
yielded: the reopened stream must go to the model version the stream's first images came from, not to
whatever the server's default is by then, or one iteration mixes two models' images."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import grpc
from reliability_support import copy_version_atomically, write_gen
from server_support import start_server, wait_until

from genserve_client import GenserveClient, GenserveClientError


def test_a_reopened_stream_stays_on_the_version_its_first_images_came_from(tmp_path: Path) -> None:
    # A stream asks for the default version (no `version`) and gets 1. A reload then serves version 2
    # (version_policy latest 1): version 1 drains, and once drain_grace_s passes while the stream still
    # runs it unloads, so the stream breaks (UNAVAILABLE, "resume with start_index"). The library
    # reopens it; a reopened stream for the default version would now get version 2's images under
    # the same iteration. It must stay on version 1 (here: fail, since version 1 is gone).
    repo = tmp_path / "models"
    write_gen(repo)
    write_gen(tmp_path / "staging", version="2", seed=1)
    server = start_server(repo, tmp_path / "server", config={"warmup": False, "drain_grace_s": 0.3})
    versions: list[str] = []
    error: GenserveClientError | None = None
    try:
        with GenserveClient(server.target) as client:
            stream = client.sample_stream("gen", 200_000, chunk_size=16, format="tensor")
            chunks = iter(stream)
            versions.append(next(chunks).provenance.version)
            copy_version_atomically(repo / "gen", "2", "2", tmp_path / "staging" / "gen")
            server.proc.send_signal(signal.SIGHUP)

            def only_2() -> bool:
                return [v.version for v in client.get_model("gen").versions] == ["2"]

            wait_until(only_2, 30, "version 1 unloaded, version 2 serving")
            deadline = time.monotonic() + 60
            try:
                for chunk in chunks:
                    versions.append(chunk.provenance.version)
                    if chunk.provenance.version != "1" or time.monotonic() > deadline:
                        break
            except GenserveClientError as exc:
                error = exc
            stream.cancel()
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "staging")
    assert set(versions) == {"1"}, f"one stream yielded images of versions {sorted(set(versions))}"
    # Version 1 is gone: the stream cannot go on with its model.
    assert error is not None and error.code == grpc.StatusCode.NOT_FOUND, error
