"""Claims of the docs checked against the server's code (docs/operations.md, docs/server.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from genserve_contract.kinds import KIND_NAMES
from genserve_server.config import load_server_config


def test_relative_trt_engine_cache_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """docs/operations.md: "Relative paths in the config file are relative to the file's directory."
    tls and auth paths were, but `trt_engine_cache_dir` was handed to TensorRT as written, so it
    resolved against whatever directory the server was started from."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    path = config_dir / "server.json"
    path.write_text(json.dumps({"trt_engine_cache_dir": "trt-cache"}))
    assert load_server_config(path).trt_engine_cache_dir == str(config_dir / "trt-cache")
    # An absolute path is kept as it is.
    path.write_text(json.dumps({"trt_engine_cache_dir": "/var/cache/genserve/trt"}))
    assert load_server_config(path).trt_engine_cache_dir == "/var/cache/genserve/trt"


REPO_ROOT = Path(__file__).resolve().parents[2]


def _model_info_kinds(proto_text: str) -> set[str]:
    """The kinds listed in the comment above `ModelInfo.kind` in genserve.proto."""
    block = proto_text[proto_text.index("message ModelInfo {") :]
    comment = block[: block.index("string kind = 2;")]
    lines = [
        line.strip().removeprefix("//") for line in comment.splitlines() if line.strip().startswith("//")
    ]
    return {word.strip() for word in ",".join(lines).split(",") if word.strip()}


def test_model_info_kind_comment_lists_every_kind() -> None:
    """genserve.proto is the API contract: ModelInfo.kind's comment lists the values a client can
    receive. It left out two_way_translator, which ListModels returns for cyclegan-digits."""
    text = (REPO_ROOT / "protos" / "genserve" / "v1" / "genserve.proto").read_text()
    assert _model_info_kinds(text) == set(KIND_NAMES)


def test_server_md_synopsis_names_every_flag() -> None:
    """docs/server.md opens with the synopsis of `genserve-server serve` and `health`; it left out
    --trt-engine-cache-dir and the health probe's TLS and token flags."""
    import re

    from genserve_server.main import build_parser

    text = (REPO_ROOT / "docs" / "server.md").read_text()
    synopsis = text[text.index("```") + 3 :]
    synopsis = synopsis[: synopsis.index("```")]
    documented = {
        name: set(re.findall(r"--[a-z][a-z-]*", part))
        for name, part in zip(("serve", "health"), synopsis.split("genserve-server health"), strict=True)
    }
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("serve", "health"):
        flags = {
            option
            for action in subparsers.choices[name]._actions
            for option in action.option_strings
            if option.startswith("--") and option != "--help"
        }
        assert flags == documented[name], (name, flags ^ documented[name])


def test_operations_md_image_metadata_limits_are_the_codecs_constants() -> None:
    """docs/operations.md's limits table quotes codecs' walk limits by name and value (1,000 marker
    segments or non-IDAT chunks, 65,536 IDAT chunks, 128 KiB of JPEG tables, 1,000 scans): a
    constant changed without the table would leave operators reading the old limit."""
    from genserve_server import codecs

    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `max_input_pixels`"))
    claims = {
        "MAX_JPEG_SCANS": ("at most 1,000 scans", codecs.MAX_JPEG_SCANS == 1000),
        "MAX_IMAGE_METADATA_SEGMENTS": (
            "at most 1,000 marker segments",
            codecs.MAX_IMAGE_METADATA_SEGMENTS == 1000,
        ),
        "MAX_PNG_IDAT_CHUNKS": ("at most 65,536 IDAT chunks", codecs.MAX_PNG_IDAT_CHUNKS == 65536),
        "MAX_JPEG_HEADER_BYTES": ("at most 128 KiB", codecs.MAX_JPEG_HEADER_BYTES == 128 * 1024),
    }
    for name, (phrase, holds) in claims.items():
        assert f"codecs.{name}" in row, name
        assert phrase in row and holds, (name, phrase)


def test_the_limits_table_and_proto_say_counts_are_bounded_by_the_queue_too() -> None:
    """A request's count is bounded by the model's batching.max_queue_size as well as by
    max_images_per_request (service_parts.row_limit, 96fa62d); the limits table and the proto
    comments quoted 256 (or max_images_per_request) alone."""
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `max_images_per_request`"))
    assert "batching.max_queue_size" in row and "naming the field and the limit" in row
    proto = (REPO_ROOT / "protos" / "genserve" / "v1" / "genserve.proto").read_text()
    for message, field in (
        ("SampleRequest", "uint32 count = 3;"),
        ("SampleStreamRequest", "uint32 chunk_size = 3;"),
        ("MixStylesRequest", "repeated StyleMix mixes = 3;"),
        ("InterpolateRequest", "uint32 steps = 5;"),
        ("EncodeRequest", "repeated Image images = 3;"),
        ("DecodeRequest", "Tensor latents = 3;"),
        ("ImageRequest", "repeated Image images = 3;"),
        ("SampleCodesRequest", "uint32 count = 3;"),
    ):
        block = proto[proto.index(f"message {message} {{") :]
        lines = block[: block.index(field)].splitlines()
        above: list[str] = []
        for line in reversed(lines[:-1]):  # the comment lines right above the field
            if not line.strip().startswith("//"):
                break
            above.append(line)
        comment = "\n".join(above)
        assert "max_queue_size" in comment or "ModelInfo.max_images_per_request" in comment, message


def test_the_style_section_says_the_image_cache_holds_style_images() -> None:
    """docs/server.md's style-generator section said the image cache does not hold style images (its
    key had the generator's load, not the mapping's), but the cache keys a style image by both
    loaded versions and serves it again (core.sample, tests/server/test_image_cache_versions.py):
    an operator sizing image_cache_bytes for a style model was told it does nothing there."""
    text = (REPO_ROOT / "docs" / "server.md").read_text()
    section = text[text.index("## Style generators") :]
    section = " ".join(section[: section.index("\n## ", 1)].split())
    assert "does not hold style images" not in section
    assert "image cache holds style images" in section and "mapping's loaded version" in section


def test_model_repository_md_names_every_card_field_a_default_card_leaves_out() -> None:
    """docs/model-repository.md: "Every field above is present in every card, except ...". Seven
    default cards, written before the code kinds, have no grid, codebook_size, top_grid or
    top_codebook_size (absent reads as null): the exceptions must name each field a card lacks."""
    text = (REPO_ROOT / "docs" / "model-repository.md").read_text()
    table = text.split("## card.json (format_version 1)", 1)[1].split("\n\n", 1)[0]
    fields = {
        name for line in table.splitlines()[3:] for name in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])
    }
    start = text.index("Every field above is present in every card")
    claim = text[start : text.index("\n\n", start)]
    named = set(re.findall(r"`([a-z_0-9]+)`", claim))
    cards = sorted((REPO_ROOT / "models").glob("*/*/card.json"))
    assert cards
    unnamed = {
        f"{card.parent.parent.name}/{card.parent.name}": sorted(
            fields - named - set(json.loads(card.read_text()))
        )
        for card in cards
    }
    assert {card: missing for card, missing in unnamed.items() if missing} == {}


def test_every_doc_gives_the_same_thread_count_for_cyclegan_digits_batch_dependence() -> None:
    """ca99df9 checks rows at smaller shapes too, which finds the bundled cyclegan-digits' batch of
    one in other float bits from 2 intra-op threads on (at 16x28): README.md and docs/server.md's
    "Rows alone or batched" say 2+, but docs/server.md's two-way translator section still said "4 or
    more intra-op threads" (and loader.check_rows' docstring "at 4+ threads")."""
    from genserve_server import loader

    texts = {
        "README.md": (REPO_ROOT / "README.md").read_text(),
        "docs/server.md": (REPO_ROOT / "docs" / "server.md").read_text(),
        "loader.check_rows": loader.check_rows.__doc__ or "",
    }
    claims = {
        (where, " ".join(match.group(0).split()))
        for where, text in texts.items()
        for match in re.finditer(
            r"cyclegan-digits`?[^.]{0,160}?(\d+)(\+| or more)\s+(intra-op\s+)?threads", text
        )
    }
    assert claims, "no claim found"
    assert {claim for claim in claims if not re.search(r"\b2(\+| or more)\s", claim[1])} == set()


def test_operations_md_says_what_a_request_pinned_to_a_retired_version_gets(tmp_path: Path) -> None:
    """docs/operations.md's hot reload said a retired version drains and is removed, but never what a
    request naming it gets: UNAVAILABLE while it drains, NOT_FOUND once unloaded. The texts the
    docs give are the server's own (Model.resolve), with the model and version as NAME and N."""
    import pytest
    from server_support import TINY_LATENT, generator_graph, write_model

    from genserve_server.config import ServerConfig
    from genserve_server.errors import NotFound, Unavailable
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository

    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]}
    policy = {"version_policy": {"latest": 2}}
    for version in ("7", "8"):
        write_model(
            root,
            "gen",
            "generator",
            generator_graph(TINY_LATENT, 1, 8, 8),
            card,
            config=policy,
            version=version,
        )
    repo = Repository(root, ServerConfig(), Metrics(enabled=False))
    repo.scan()
    model = repo.models["gen"]
    model.versions["7"].state = ModelState.DRAINING
    with pytest.raises(Unavailable) as draining:
        model.resolve("7")
    del model.versions["7"]
    with pytest.raises(NotFound) as unloaded:
        model.resolve("7")

    def as_documented(message: str) -> str:
        return message.replace("gen", "NAME").replace("'7'", "'N'").replace(" 7 ", " N ").replace("8", "...")

    text = " ".join((REPO_ROOT / "docs" / "operations.md").read_text().split())
    for code, error in (("UNAVAILABLE", draining.value), ("NOT_FOUND", unloaded.value)):
        documented = f"`{code}` `{as_documented(str(error))}`"
        assert documented in text, documented


def test_the_proto_says_superresolve_inputs_are_bounded_by_a_pixel_count_not_a_side() -> None:
    """max_sr_input_pixels bounds an input's pixels (width x height), not its sides: an 8x131072
    input is within it and its x4 output is 32x524288. ImageRequest.images' comment said inputs
    were at most 1024x1024 "so that a x4 output stays within 4096x4096"."""
    from genserve_server.config import Kind, Limits

    limit, name = Limits().input_pixels(Kind.SUPER_RESOLUTION)
    assert name == "max_sr_input_pixels" and 8 * 131072 <= limit  # a long, thin input is taken
    proto = (REPO_ROOT / "protos" / "genserve" / "v1" / "genserve.proto").read_text()
    block = proto[proto.index("message ImageRequest {") :]
    comment = " ".join(
        line.strip().removeprefix("//").strip()
        for line in block[: block.index("repeated Image images = 3;")].splitlines()
        if line.strip().startswith("//")
    )
    assert "within 4096x4096" not in comment
    assert "max_sr_input_pixels" in comment and f"{limit:,}" in comment


def _bundled_working_set(name: str, n: int, side: int, tile_size: int | None = None) -> int:
    """The working set a SuperResolve (tile_size) or Translate of n RGB side² images on the bundled
    model `name` holds by the constant estimate (a GPU session's rule), PNG out, its batches as its
    config.json's batching allows (max_batch_size within max_batch_pixels) and its instances."""
    from genserve.v1 import types_pb2 as tpb
    from genserve_server import tiling, validate
    from genserve_server.batch_keys import TileRows
    from genserve_server.config import load_card, load_model_config
    from genserve_server.core import image_working_set, padded_size
    from genserve_server.loader import rows_within_pixels

    card = load_card(REPO_ROOT / "models" / name / "1" / "card.json")
    config = load_model_config(REPO_ROOT / "models" / name / "config.json")
    padded = padded_size(side, side, card.size_multiple)
    if tile_size is not None:
        plan = tiling.plan_tiles(*padded, tile_size, card.tile_overlap, card.size_multiple)
    else:
        plan = tiling.whole_image(*padded)
    shape = (card.input_channels or card.channels, plan[0].h, plan[0].w)
    batching = config.batching
    rows = min(batching.max_batch_size, rows_within_pixels(TileRows(shape), batching.max_batch_pixels))
    out = validate.output_spec(tpb.IMAGE_FORMAT_PNG, 0, None, False)
    return image_working_set(
        card, [(side, side)] * n, [padded] * n, [plan] * n, out, rows, config.instances, on_cpu=False
    )


def test_operations_md_working_set_figures_are_what_the_bundled_models_hold() -> None:
    """docs/operations.md sized the working-set budgets by figures from before the estimate counted
    the encode's float32 copy and the batches a model's instances compute at once: a 1024² x4
    SuperResolve '~0.83-0.89 GB' (it holds 0.99 GB in 128² tiles), a Translate of 16 RGB 1024²
    images '~0.75 GB' (0.91 GB: the bundled translators' two instances each compute 4 of them), one
    of 16 at 2048² '~2.6 GB' (2.7 GB). The figures are the bundled models' estimates, to 0.01 GB."""
    gb = {
        "sr 1024 tile 1024": _bundled_working_set("sr-photos-x4", 1, 1024, 1024) / 1e9,
        "sr 1024 tile 128": _bundled_working_set("sr-photos-x4", 1, 1024, 128) / 1e9,
        "sr 256": _bundled_working_set("sr-photos-x4", 1, 256, 128) / 1e9,
        "translate 16 x 1024": _bundled_working_set("pix2pix-colorize", 16, 1024) / 1e9,
        "translate 16 x 2048": _bundled_working_set("pix2pix-colorize", 16, 2048) / 1e9,
    }
    assert _bundled_working_set("unet-denoise", 16, 1024) / 1e9 == gb["translate 16 x 1024"]
    text = " ".join((REPO_ROOT / "docs" / "operations.md").read_text().split())
    sr = f"~{gb['sr 1024 tile 1024']:.2f}-{gb['sr 1024 tile 128']:.2f} GB"
    claims = [
        f"A 1024² ×4 request holds {sr} (with `tile_size` 1024 or 128)",
        f"(a 256² input holds ~{round(gb['sr 256'] * 1000, -1):.0f} MB)",
        f"A request of 16 RGB 1024² images holds ~{gb['translate 16 x 1024']:.2f} GB",
        f"one of 16 at 2048² (~{gb['translate 16 x 2048']:.1f} GB) runs alone",
        f"(~{gb['translate 16 x 1024']:.2f} GB a 16-image Translate, {sr} a 1024² SuperResolve)",
    ]
    missing = [claim for claim in claims if claim not in text]
    assert not missing, f"docs/operations.md does not say: {missing}"
    # The limits table: two of each at a time within the default 2 GiB budgets.
    two_gib = 2 * 1024**3 / 1e9
    assert 2 * gb["sr 1024 tile 128"] <= two_gib and 2 * gb["translate 16 x 1024"] <= two_gib


def _documented_serve_flag_values() -> list[tuple[str, str]]:
    """Every inline `--flag VALUE` of a `genserve-server serve` flag in README.md and docs/*.md whose
    value is a real one (not a placeholder such as PORT, S or FILE), with the file it is in."""
    from genserve_server.main import build_parser

    subparsers = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    flags = {option for action in subparsers.choices["serve"]._actions for option in action.option_strings}
    found = []
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for match in re.finditer(r"`(--[a-z][a-z-]*)[ =]([^`\s]+)`", path.read_text()):
            flag, value = match.groups()
            if flag in flags and not re.fullmatch(r"[A-Z][A-Z_,]*|\.\.\.", value):
                found.append((path.name, f"{flag} {value}"))
    return found


@pytest.mark.parametrize(("doc", "span"), _documented_serve_flag_values())
def test_every_documented_serve_flag_value_is_one_the_parser_takes(doc: str, span: str) -> None:
    """docs/operations.md told operators to look at a failed call's stack "at `--log-level debug`":
    the parser takes DEBUG|INFO|WARNING|ERROR only, so the documented flag exited 2 ("invalid
    choice: 'debug'") before the server started."""
    from genserve_server.main import build_parser

    try:
        build_parser().parse_args(["serve", "--models", "models", *span.split()])
    except SystemExit as exc:
        raise AssertionError(f"{doc}: `{span}` is refused by genserve-server serve") from exc


def test_server_md_says_where_a_piped_configs_relative_paths_resolve() -> None:
    """docs/operations.md says a config read from a pipe (`--config <(envsubst < server.json)`,
    /dev/stdin), which has no directory, resolves its relative paths against the working directory
    (config._paths_base; test_relative_paths_of_a_piped_server_config_are_relative_to_the_working_directory);
    docs/server.md's own section on the file did not, where an operator reads its fields."""
    text = (REPO_ROOT / "docs" / "server.md").read_text()
    section = text[text.index("## Server config file") :]
    section = " ".join(section[: section.index("\n## ", 1)].split())
    assert "relative to the file's directory" in section
    assert re.search(r"pipe \(`--config <\(envsubst < server\.json\)`.*to the working directory", section)


def test_client_md_says_an_animated_png_or_webp_is_read_as_its_first_frame() -> None:
    """An animated PNG or WebP sent as a file is served as its first frame (Pillow's default frame:
    the rest are never decoded), a GIF is refused naming the image and the formats taken; the docs
    said what the server does with a file's EXIF orientation and ICC profile, and nothing of its
    frames, so a client sending an animation could not tell which picture it got back."""
    import io

    import numpy as np
    from PIL import Image

    from genserve_server.codecs import decode_image
    from genserve_server.errors import InvalidArgument

    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(2))
    for fmt, options in (("PNG", {}), ("WEBP", {"lossless": True, "exact": True}), ("GIF", {})):
        buffer = io.BytesIO()
        Image.fromarray(first).save(
            buffer, fmt, save_all=True, append_images=[Image.fromarray(second)], **options
        )
        if fmt == "GIF":
            with pytest.raises(InvalidArgument, match=r"images\[0\].*not a PNG, JPEG or WEBP image"):
                decode_image(buffer.getvalue(), 0, [], max_pixels=30, field="images[0]")
            continue
        decoded = decode_image(buffer.getvalue(), 0, [], max_pixels=30, field="images[0]")
        np.testing.assert_array_equal(decoded, first, err_msg=fmt)
    text = " ".join((REPO_ROOT / "docs" / "client.md").read_text().split())
    bullet = text[text.index("**Pixels are used as stored**") :]
    bullet = bullet[: bullet.index(" - **")]
    assert "animated PNG or WebP is read as its first frame" in bullet
    assert "GIF" in bullet and "not a PNG, JPEG or WEBP image" in bullet
