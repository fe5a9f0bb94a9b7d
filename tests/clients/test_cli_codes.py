"""`genserve-client sample` on a code prior (SampleCodes), and `--progress` (SampleCodesStream), as a
subprocess against a real server holding tiny synthetic code models (tests/server/code_models.py)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from client_fakes import run_cli
from code_models import write_code_models
from PIL import Image
from server_support import ServerProcess, running_server

from genserve_client import GenserveClient
from genserve_client.results import CodesProgress, CodesResult

GRID = (6, 6)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def code_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("code-models")
    names = write_code_models(root, grid=GRID, k=16, max_rows=8)
    with running_server(root, tmp_path_factory.mktemp("code-server")) as server:
        yield server, names


def test_the_library_samples_codes_and_streams_progress(
    code_server: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, names = code_server
    with GenserveClient(server.target) as client:
        unary = client.sample_codes(names["prior"], seeds=[5, 6], labels=[1], format="raw", return_codes=True)
        assert unary.seeds == [5, 6] and unary.labels == [1, 1] and len(unary.codes) == 2
        assert unary.codes[0].shape == GRID and unary.codes[0].dtype == np.int64
        items = list(
            client.sample_codes_progress(
                names["prior"], seeds=[5, 6], labels=[1], format="raw", preview_every=6
            )
        )
    *progress, last = items
    assert all(isinstance(p, CodesProgress) for p in progress) and isinstance(last, CodesResult)
    assert [p.filled for p in progress] == sorted({p.filled for p in progress}) and progress
    assert all(len(p.previews) == 2 for p in progress)
    assert last.raw == unary.raw  # the same pixels as the unary call: a pure function of the seeds


def test_cli_sample_on_a_code_prior_with_progress(
    code_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    server, names = code_server
    grid, strip = tmp_path / "grid.png", tmp_path / "progress.png"
    args = ("--target", server.target, "sample", "--model", names["prior"], "--labels", "0,2", "--n", "2")
    proc = run_cli(*args, "--seed", "4", "--grid", str(grid), "--top-k", "5", "--progress", str(strip))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("codes ")]
    assert lines and all(line.endswith(f"/{GRID[0] * GRID[1]}") for line in lines)
    with Image.open(strip) as picture, Image.open(grid) as whole:
        assert picture.width > picture.height  # previews side by side, then the final image
        assert whole.text["model"] == names["prior"]  # type: ignore[attr-defined]
    plain = run_cli(*args, "--seed", "4", "--grid", str(tmp_path / "plain.png"), "--top-k", "5")
    assert plain.returncode == 0, plain.stderr
    with Image.open(grid) as streamed, Image.open(tmp_path / "plain.png") as unary:
        assert np.array_equal(np.asarray(streamed), np.asarray(unary))  # streaming changes no pixel
    refused = run_cli("--target", server.target, "sample", "--model", names["decoder"], "--n", "1", "--grid",
                      str(tmp_path / "x.png"), "--progress", str(tmp_path / "y.png"))  # fmt: skip
    assert refused.returncode == 2 and "code priors" in refused.stderr


def test_sample_progress_is_on_stderr_and_stdout_is_what_sample_says_without_it(
    code_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    """`sample --progress` printed its `codes 24/36` lines, and a `wrote STRIP` line for every
    rewrite of the strip, on stdout, among the seed and `wrote` lines that are the command's result:
    `sample ... | head -1` got a progress line with --progress and the seed line without it. The
    progress lines go to stderr, as bulk's progress does; stdout says what the command made, the
    strip once."""
    server, names = code_server
    grid, strip = tmp_path / "grid.png", tmp_path / "progress.png"
    args = ("--target", server.target, "sample", "--model", names["prior"], "--n", "2", "--seed", "4")
    plain = run_cli(*args, "--grid", str(grid))
    streamed = run_cli(*args, "--grid", str(grid), "--progress", str(strip))
    assert plain.returncode == 0 and streamed.returncode == 0, (plain.stderr, streamed.stderr)
    progress = [line for line in streamed.stderr.splitlines() if line.startswith("codes ")]
    assert len(progress) > 1, streamed.stderr
    strip_lines = [line for line in streamed.stdout.splitlines() if str(strip) in line]
    assert len(strip_lines) == 1 and strip_lines[0].startswith(f"wrote {strip} ("), streamed.stdout
    others = [line for line in streamed.stdout.splitlines() if str(strip) not in line]
    assert others == plain.stdout.splitlines(), streamed.stdout


def test_the_asyncio_client_streams_the_same_progress(
    code_server: tuple[ServerProcess, dict[str, str]],
) -> None:
    import asyncio

    from genserve_client import AsyncGenserveClient

    server, names = code_server

    async def main() -> list[CodesProgress | CodesResult]:
        async with AsyncGenserveClient(server.target) as client:
            stream = client.sample_codes_progress(names["chain"], seeds=[3], format="raw", preview_every=3)
            return [item async for item in stream]

    items = asyncio.run(main())
    assert isinstance(items[-1], CodesResult) and len(items[-1].items) == 1
    levels = [item.level for item in items[:-1] if isinstance(item, CodesProgress)]
    assert levels[0] == "top" and levels[-1] == "codes"  # both levels of a two-level prior, top first


def test_cli_sample_on_a_prior_without_a_decoder_says_it_gives_no_images(
    code_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    # A top prior (the default repository's vqvae-digits-top-prior) gives code grids, not images:
    # `sample --out` used to print "wrote 0 images" and exit 0, `sample --grid` "a grid needs at
    # least one image" -- neither says why.
    server, names = code_server
    args = ("--target", server.target, "sample", "--model", names["top"], "--n", "2")
    for output in (("--out", str(tmp_path / "d")), ("--grid", str(tmp_path / "g.png"))):
        proc = run_cli(*args, "--seed", "3", *output)
        assert proc.returncode == 2, (output, proc.stdout, proc.stderr)
        assert "code grids, not images" in proc.stderr and names["top"] in proc.stderr
        assert "wrote 0 images" not in proc.stdout
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "g.png").exists()


def test_cli_code_prior_pngs_record_temperature_and_top_k_and_refuse_psi(
    code_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    # PNGs carry "the command's own settings" (docs/client.md): a code prior's are --temperature and
    # --top-k. They were left out, while a --psi the prior never used was written in.
    server, names = code_server
    args = ("--target", server.target, "sample", "--model", names["prior"], "--labels", "1", "--n", "2")
    grid, out = tmp_path / "g.png", tmp_path / "d"
    proc = run_cli(*args, "--seed", "3", "--temperature", "0.5", "--top-k", "4", "--grid", str(grid),
                   "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.iterdir())
    assert files
    for path in (grid, files[0]):
        with Image.open(path) as picture:
            text = picture.text  # type: ignore[attr-defined]
        assert text["temperature"] == "0.5" and text["top_k"] == "4", (path, text)
    refused = run_cli(*args, "--seed", "3", "--psi", "0.5", "--grid", str(tmp_path / "psi.png"))
    assert refused.returncode == 2 and "--psi" in refused.stderr, refused.stderr
    assert not (tmp_path / "psi.png").exists()


def test_cli_progress_strip_carries_provenance_like_every_png(
    code_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    """docs/client.md, Provenance in PNGs: every PNG the CLI writes carries text chunks (seed and
    label of its one sample, model, version, model_sha256, the command's settings). The --progress
    strip, the first sample's previews and its final image, carried none."""
    server, names = code_server
    strip, grid = tmp_path / "strip.png", tmp_path / "grid.png"
    proc = run_cli("--target", server.target, "sample", "--model", names["prior"], "--labels", "2",
                   "--n", "1", "--seed", "7", "--top-k", "5", "--grid", str(grid),
                   "--progress", str(strip))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Image.open(strip) as picture, Image.open(grid) as whole:
        text, grid_text = dict(picture.text), dict(whole.text)  # type: ignore[attr-defined]
    assert (text.get("seed"), text.get("label"), text.get("top_k")) == ("7", "2", "5"), text
    for key in ("model", "version", "model_sha256"):
        assert text.get(key) == grid_text[key], (key, text)


def test_client_md_names_every_text_chunk_of_the_progress_strip(
    code_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    """docs/client.md's sentence on the --progress strip said it records `model`, `version` and
    `model_sha256`; the strip's PNG carries what every PNG of its sample does, the `used_models` a
    code prior's images went through (its decoder) and the command's settings included. Every chunk
    the strip holds (but Software) is named there."""
    server, names = code_server
    strip, grid = tmp_path / "strip.png", tmp_path / "grid.png"
    proc = run_cli("--target", server.target, "sample", "--model", names["prior"], "--labels", "2",
                   "--n", "1", "--seed", "7", "--top-k", "5", "--temperature", "0.9", "--grid", str(grid),
                   "--progress", str(strip))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Image.open(strip) as picture, Image.open(grid) as whole:
        text, grid_text = dict(picture.text), dict(whole.text)  # type: ignore[attr-defined]
    assert text.get("used_models") and text["used_models"] == grid_text.get("used_models"), text
    doc = " ".join((REPO_ROOT / "docs" / "client.md").read_text().split())
    sentence = doc[doc.index("A `--progress` strip (below) records") :]
    sentence = sentence[: sentence.index("). ") + 2]
    missing = [key for key in text if key != "Software" and f"`{key}`" not in sentence]
    assert not missing, (missing, sentence)


def test_a_prior_without_a_decoder_returns_the_seeds_it_picked(
    code_server: tuple[ServerProcess, dict[str, str]],
) -> None:
    """genserve.proto SampleCodesRequest.base_seed: "Absent: the server picks one and returns the seeds
    it used." A prior without a decoder (a top prior) answers grids only, and its seeds rode only on
    the images: a call without seeds got grids that nothing could reproduce."""
    server, names = code_server
    with GenserveClient(server.target) as client:
        picked = client.sample_codes(names["top"], 2)
        assert len(picked.codes) == 2
        assert len(picked.seeds) == 2 and all(seed is not None for seed in picked.seeds), picked.seeds
        again = client.sample_codes(names["top"], seeds=[int(s) for s in picked.seeds if s is not None])
    for a, b in zip(again.codes, picked.codes, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sample_prints_its_random_seed_only_for_images_it_made(
    code_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    # Without --seed, `sample` printed "seed N (repeat with --seed N)" before its calls, so a command
    # that then failed (a top prior's code grids, a --progress asking more than one call) told of a
    # seed used for images it never made, on stdout, where scripts read it.
    server, names = code_server
    t = ("--target", server.target, "sample", "--n", "2")
    failing = (
        ("--model", names["top"], "--grid", str(tmp_path / "g.png")),
        ("--model", names["prior"], "--n", "1000", "--grid", str(tmp_path / "p.png"), "--progress",
         str(tmp_path / "s.png")),
    )  # fmt: skip
    for args in failing:
        proc = run_cli(*t, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "seed" not in proc.stdout, (args, proc.stdout)
    made = run_cli(*t, "--model", names["prior"], "--labels", "1", "--grid", str(tmp_path / "ok.png"))
    assert made.returncode == 0, made.stderr
    seed = int(made.stdout.split("seed ", 1)[1].split()[0])
    with Image.open(tmp_path / "ok.png") as grid:
        assert grid.text["seeds"] == f"{seed}..{seed + 1}"  # type: ignore[attr-defined]


def test_cli_sample_refuses_a_label_the_prior_has_no_class_for_before_any_call(
    code_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    # `--labels 0,1,7` on a prior of 3 classes and a row budget of 8 (--n 4: 12 samples, calls of
    # 8): the first call sampled and decoded classes 0 and 1, then the server refused the second's
    # 'labels[0] ... got 7' (an index of that call, not of --labels), exit 1: the work thrown away,
    # nothing written.
    server, names = code_server
    before = server.metric("genserve_requests_total", model=names["prior"], method="SampleCodes")
    out = tmp_path / "d"
    args = ("--target", server.target, "sample", "--model", names["prior"], "--n", "4", "--seed", "1")
    for bad in (("--labels", "0,1,7"), ("--label", "3")):
        proc = run_cli(*args, *bad, "--out", str(out))
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert bad[0] in proc.stderr and "class" in proc.stderr and "[0, 3)" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert server.metric("genserve_requests_total", model=names["prior"], method="SampleCodes") == before
    assert not out.exists()
    proc = run_cli(*args, "--labels", "0,1,2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.png"))) == 12


def _prior_pixels_and_text(
    target: str, model: str, out: Path, *extra: str
) -> tuple[np.ndarray, dict[str, str]]:
    proc = run_cli("--target", target, "sample", "--model", model, "--labels", "1", "--n", "1",
                   "--seed", "11", "--out", str(out), *extra)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (path,) = sorted(out.iterdir())
    with Image.open(path) as picture:
        return np.asarray(picture).copy(), dict(picture.text)  # type: ignore[attr-defined]


def test_a_code_priors_config_defaults_are_in_the_provenance_and_pngs_and_replay_the_images(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """types.proto: Provenance is "enough to reproduce it bit for bit", and a request that leaves
    temperature and top_k unset samples at the prior's config.json `sampling`. Two servers whose
    priors differ only there gave other images for the same seed under identical provenance, and the
    `sample` PNGs recorded neither: a replay could not tell what to send."""
    servers = []
    for i, sampling in enumerate(({"temperature": 0.3, "top_k": 3}, {"temperature": 2.5})):
        root = tmp_path_factory.mktemp(f"priors{i}")
        names = write_code_models(root, grid=GRID, k=16, max_rows=8)
        config_path = root / names["prior"] / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "sampling": sampling}))
        servers.append(running_server(root, tmp_path_factory.mktemp(f"server{i}")))
    prior = names["prior"]
    with servers[0] as a, servers[1] as b:
        with GenserveClient(a.target) as client:
            first = client.sample_codes(prior, seeds=[11], labels=[1], format="raw").provenance
            chained = client.sample_codes(names["chain"], seeds=[11], format="raw").provenance
        with GenserveClient(b.target) as client:
            second = client.sample_codes(prior, seeds=[11], labels=[1], format="raw").provenance
        assert (first.temperature, first.top_k) == (pytest.approx(0.3), 3), first
        assert (second.temperature, second.top_k) == (pytest.approx(2.5), 16), second  # 0: every code
        assert chained.used_sampling == ((names["top"], 1.0, 16),), chained  # its top prior's own
        out = tmp_path_factory.mktemp("pngs")
        pixels_a, text_a = _prior_pixels_and_text(a.target, prior, out / "a")
        pixels_b, text_b = _prior_pixels_and_text(b.target, prior, out / "b")
        assert not np.array_equal(pixels_a, pixels_b)
        assert (text_a.get("temperature"), text_a.get("top_k")) == ("0.3", "3"), text_a
        assert (text_b.get("temperature"), text_b.get("top_k")) == ("2.5", "16"), text_b
        replay = ("--temperature", text_a["temperature"], "--top-k", text_a["top_k"])
        pixels_replayed, text_replayed = _prior_pixels_and_text(b.target, prior, out / "replay", *replay)
    assert np.array_equal(pixels_replayed, pixels_a)
    assert (text_replayed["temperature"], text_replayed["top_k"]) == ("0.3", "3")


def test_a_two_level_sample_replayed_from_its_provenance_gives_the_same_bytes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A two-level prior samples its top grid at its top prior's config.json `sampling` and the
    bottom grid at its own, and the provenance records both (the top prior's in used_models), but a
    request had one temperature and top_k for both levels: sent back as a replay, the top grid was
    sampled at the bottom's settings, other grids and other images."""
    root = tmp_path_factory.mktemp("two-level")
    names = write_code_models(root, grid=GRID, k=16, max_rows=8)
    for name, sampling in (
        (names["chain"], {"temperature": 0.5, "top_k": 3}),
        (names["top"], {"temperature": 2.0}),
    ):
        config_path = root / name / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sampling": sampling}))
    chain, seeds = names["chain"], [11, 12, 13]
    with (
        running_server(root, tmp_path_factory.mktemp("server")) as server,
        GenserveClient(server.target) as client,
    ):
        first = client.sample_codes(chain, seeds=seeds, format="png", return_codes=True)
        replay = first.provenance.replay_options()
        assert replay == {"temperature": 0.5, "top_k": 3, "top_temperature": 2.0, "top_top_k": 16}, replay
        again = client.sample_codes(chain, seeds=seeds, format="png", return_codes=True, **replay)
        # A provenance without the top prior's sampling (a server older than UsedModel.temperature)
        # replays as before: one temperature and top_k, for both levels.
        old = dataclasses.replace(first.provenance, used_sampling=())
        assert old.replay_options() == {"temperature": 0.5, "top_k": 3}
        both = client.sample_codes(
            chain, seeds=seeds, format="png", return_codes=True, **old.replay_options()
        )
        given = client.sample_codes(
            chain, seeds=seeds, format="png", return_codes=True, temperature=0.5, top_k=3
        )
    assert [item.raw for item in again.items] == [item.raw for item in first.items]
    assert all(np.array_equal(a, b) for a, b in zip(again.top_codes, first.top_codes, strict=True))
    assert again.provenance == first.provenance
    assert [item.raw for item in both.items] == [item.raw for item in given.items]


def test_a_two_level_sample_replayed_by_the_cli_from_its_png_gives_the_same_pixels(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`sample` PNGs recorded the prior's temperature and top_k, and docs/client.md said that
    `--temperature T --top-k K` with them gives the same images; a two-level prior whose top prior
    samples at other defaults got its top grids at the bottom's settings, other pixels. The PNG
    records the top level's too, and --top-temperature / --top-top-k replay it."""
    root = tmp_path_factory.mktemp("two-level-cli")
    names = write_code_models(root, grid=GRID, k=16, max_rows=8)
    for name, sampling in (
        (names["chain"], {"temperature": 0.5, "top_k": 3}),
        (names["top"], {"temperature": 2.0}),
    ):
        config_path = root / name / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sampling": sampling}))
    out = tmp_path_factory.mktemp("pngs")

    def pixels_and_text(folder: str, *extra: str) -> tuple[np.ndarray, dict[str, str]]:
        proc = run_cli("--target", server.target, "sample", "--model", names["chain"], "--n", "3",
                       "--seed", "11", "--grid", str(out / f"{folder}.png"), *extra)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        with Image.open(out / f"{folder}.png") as picture:
            return np.asarray(picture).copy(), dict(picture.text)  # type: ignore[attr-defined]

    with running_server(root, tmp_path_factory.mktemp("server")) as server:
        pixels, text = pixels_and_text("defaults")
        assert {k: text.get(k) for k in ("temperature", "top_k", "top_temperature", "top_top_k")} == {
            "temperature": "0.5",
            "top_k": "3",
            "top_temperature": "2.0",
            "top_top_k": "16",
        }, text
        replay = ("--temperature", text["temperature"], "--top-k", text["top_k"],
                  "--top-temperature", text["top_temperature"], "--top-top-k", text["top_top_k"])  # fmt: skip
        replayed, replayed_text = pixels_and_text("replay", *replay)
        refused = run_cli("--target", server.target, "sample", "--model", names["prior"], "--label", "0",
                          "--n", "1", "--grid", str(out / "x.png"), "--top-temperature", "2")  # fmt: skip
    assert np.array_equal(replayed, pixels)
    assert replayed_text["top_temperature"] == "2.0" and replayed_text["top_top_k"] == "16"
    assert refused.returncode != 0 and "top_temperature" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    ("used", "asked", "refused"),
    [
        ((1.0, 16), {"top_temperature": 2.0}, "top_temperature"),  # an older server ignored it
        ((2.0, 16), {"top_temperature": 2.0, "top_top_k": 5}, "top_top_k"),
        (None, {"top_top_k": 5}, "top_top_k"),  # a provenance without the top level's sampling
        ((2.0, 5), {"top_temperature": 2.0, "top_top_k": 5}, ""),  # applied: the result as it came
        (None, {}, ""),  # not asked for
    ],
)
def test_top_level_sampling_a_server_did_not_apply_is_refused_not_returned(
    used: tuple[float, int] | None, asked: dict[str, float | int], refused: str
) -> None:
    """A server older than SampleCodesRequest.top_temperature / top_top_k ignores them (unknown
    fields) and samples the top grids at its defaults: the library returned those grids as if
    sampled as asked. Where the provenance does not show the top level sampled as asked, the call
    fails FAILED_PRECONDITION naming the field."""
    import grpc

    from genserve.v1 import genserve_pb2, types_pb2
    from genserve_client.errors import GenserveClientError

    request = genserve_pb2.SampleCodesRequest(model="chain", seeds=[1], **asked)  # type: ignore[arg-type]
    provenance = types_pb2.Provenance(model="chain", version="1", temperature=0.5, top_k=3)
    if used is not None:
        provenance.used_models.add(model="top", version="1", temperature=used[0], top_k=used[1])
    response = genserve_pb2.SampleCodesResponse(provenance=provenance)
    if not refused:
        result = CodesResult.from_codes_proto(response, "rid-1", request)
        assert result.provenance.temperature == 0.5
        return
    with pytest.raises(GenserveClientError) as info:
        CodesResult.from_codes_proto(response, "rid-1", request)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused in info.value.details and "older" in info.value.details, info.value.details
    assert info.value.request_id == "rid-1"
