"""Tests for genserve_server.latents: the seed -> latent contract of genserve.v1.

The golden values below are only as good as the Philox core they came from, so the core is pinned
independently: to the Random123 known-answer vectors (tests/kat_vectors of
github.com/DEShawResearch/random123) and, through a width-generic scalar reference, to numpy's own
C implementation of Philox4x64-10.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genserve_server import latents
from genserve_server.errors import InvalidArgument
from genserve_server.latents import (
    InterpolationMode,
    eps_for_seed,
    interpolate,
    latents_for_seeds,
    normals_for_seed,
    philox4x32_10,
)

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter, key -> expected.
PHILOX4X32_10_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip

GOLDEN_SEEDS = [0, 1, 2**62 + 12345]
GOLDEN_Z8 = np.array(
    [
        [0.991137683391571, -0.9246625900268555, -0.6176089644432068, -0.48206859827041626,
         -0.15363822877407074, 0.18082590401172638, 0.8317351341247559, 0.19743971526622772],
        [0.38040074706077576, -0.29627788066864014, -0.2492334246635437, -1.00383722782135,
         0.6269478797912598, -0.6339837908744812, -0.6782715916633606, -1.0130805969238281],
        [1.5936061143875122, 0.8249068856239319, -0.19836857914924622, 0.5917957425117493,
         -0.8345305919647217, -0.0897207036614418, -0.23178276419639587, 0.8989127278327942],
    ],
    dtype=np.float32,
)  # fmt: skip
GOLDEN_Z8_PSI_05 = np.array(
    [
        [-0.2696499824523926, 0.3515823781490326, 0.44540634751319885, -0.48206859827041626,
         -0.15363822877407074, 0.18082590401172638, -0.12755165994167328, 0.19743971526622772],
        [0.38040074706077576, -0.29627788066864014, -0.2492334246635437, -0.3889370858669281,
         0.16957741975784302, 0.46226927638053894, -0.1388295590877533, 0.09669841825962067],
        [0.45068901777267456, -0.27224916219711304, -0.19836857914924622, 0.3805198073387146,
         -0.21956783533096313, -0.0897207036614418, -0.23178276419639587, -0.4314782917499542],
    ],
    dtype=np.float32,
)  # fmt: skip


def reference_philox4(counter: list[int], key: list[int], width: int, rounds: int = 10) -> list[int]:
    """Scalar Philox4xW written from the paper with Python ints: an independent implementation."""
    if width == 32:
        m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    else:
        m0, m1, w0, w1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157, 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
    mask = (1 << width) - 1
    ctr, k = list(counter), list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + w0) & mask, (k[1] + w1) & mask]
        p0, p1 = m0 * ctr[0], m1 * ctr[2]
        ctr = [(p1 >> width) ^ ctr[1] ^ k[0], p1 & mask, (p0 >> width) ^ ctr[3] ^ k[1], p0 & mask]
    return ctr


def reference_latent(seed: int, dim: int, psi: float | None) -> list[float]:
    """The proto's algorithm, literally, one normal at a time (slow; for cross-checking)."""

    def stream() -> list[float]:
        out: list[float] = []
        block = 0
        while True:
            words = reference_philox4(
                [block & 0xFFFFFFFF, block >> 32, 0, 0], [seed & 0xFFFFFFFF, seed >> 32], 32
            )
            u = [(x + 0.5) / 2**32 for x in words]
            for ua, ub in ((u[0], u[1]), (u[2], u[3])):
                r, t = math.sqrt(-2.0 * math.log(ua)), 2.0 * math.pi * ub
                out.extend([r * math.cos(t), r * math.sin(t)])
            block += 1
            if len(out) >= 4 * dim + 4096:
                return out

    normals = stream()
    z = [float(np.float32(v)) for v in normals[:dim]]
    if psi is not None:
        nxt = dim
        for j in range(dim):
            while abs(z[j]) > psi:
                z[j] = float(np.float32(normals[nxt]))
                nxt += 1
    return z


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX4X32_10_KAT)
def test_philox_known_answers(
    counter: tuple[int, ...], key: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    out = philox4x32_10(np.array(counter, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert tuple(out.tolist()) == expected
    assert tuple(reference_philox4(list(counter), list(key), 32)) == expected


def test_philox_known_answers_batched() -> None:
    counters = np.array([c for c, _, _ in PHILOX4X32_10_KAT], dtype=np.uint32)
    keys = np.array([k for _, k, _ in PHILOX4X32_10_KAT], dtype=np.uint32)
    assert [tuple(row) for row in philox4x32_10(counters, keys).tolist()] == [
        e for _, _, e in PHILOX4X32_10_KAT
    ]


def test_reference_round_structure_matches_numpy_philox4x64() -> None:
    """numpy ships Philox4x64-10 in C: the same round and key schedule at 64 bits, independently coded."""
    rng = np.random.default_rng(7)
    for _ in range(5):
        counter = [int(v) for v in rng.integers(0, 2**63, size=4, dtype=np.uint64)]
        key = [int(v) for v in rng.integers(0, 2**63, size=2, dtype=np.uint64)]
        # numpy increments the counter before generating its first block.
        generator = np.random.Philox(
            counter=np.array(counter, dtype=np.uint64), key=np.array(key, dtype=np.uint64)
        )
        raw = generator.random_raw(4).tolist()
        assert raw == reference_philox4([counter[0] + 1, *counter[1:]], key, 64)


@settings(max_examples=50, deadline=None)
@given(
    counters=st.lists(st.tuples(*[st.integers(0, 2**32 - 1)] * 4), min_size=1, max_size=8),
    key=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)
def test_vectorised_philox_matches_scalar_reference(
    counters: list[tuple[int, ...]], key: tuple[int, int]
) -> None:
    out = philox4x32_10(np.array(counters, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert [tuple(row) for row in out.tolist()] == [
        tuple(reference_philox4(list(c), list(key), 32)) for c in counters
    ]


@settings(max_examples=40, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=24),
    first_block=st.one_of(st.integers(0, 64), st.integers(2**32 - 8, 2**32 - 1), st.integers(2**40, 2**41)),
    n_blocks=st.integers(1, 40),
)
def test_small_requests_python_philox_words_equal_numpys(
    seeds: list[int], first_block: int, n_blocks: int
) -> None:
    """Small batches' blocks take the Python-integer path (64-bit lanes, seed by seed); its words are
    numpy's, bit for bit, including counters whose high word is set (block >= 2^32)."""
    keys = latents._seed_keys(seeds, "seeds")
    blocks = range(first_block, first_block + n_blocks)
    block_numbers = np.array(blocks, dtype=np.uint64)
    counters = np.zeros((len(blocks), 4), dtype=np.uint32)
    counters[:, 0] = (block_numbers & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    counters[:, 1] = (block_numbers >> np.uint64(32)).astype(np.uint32)
    expected = philox4x32_10(counters[np.newaxis, :, :], keys[:, np.newaxis, :])
    np.testing.assert_array_equal(latents._philox_words_lanes(keys, blocks), expected)


@pytest.mark.parametrize("dim", [1, 20, 64, 100, 101, 128])
def test_a_seed_alone_and_in_a_large_batch_take_both_paths_to_the_same_bits(dim: int) -> None:
    # One seed is drawn on Python integers (_philox_words_lanes), 64 seeds with numpy (above
    # _LANES_PHILOX_MAX_LANES (seed, block) pairs: every dim here but 1).
    seeds = [3, 2**33 + 1, *range(100, 162)]
    batch = latents_for_seeds(seeds, dim, 0.9)
    for i in (0, 1, 63):
        np.testing.assert_array_equal(latents_for_seeds([seeds[i]], dim, 0.9)[0], batch[i])


def test_first_normal_of_seed_zero_comes_from_the_zero_kat_vector() -> None:
    # Seed 0, block 0 is counter 0 and key 0: the first KAT line, through Box-Muller by hand.
    x0, x1, x2, x3 = PHILOX4X32_10_KAT[0][2]
    r01 = math.sqrt(-2.0 * math.log((x0 + 0.5) / 2**32))
    r23 = math.sqrt(-2.0 * math.log((x2 + 0.5) / 2**32))
    t01, t23 = 2 * math.pi * (x1 + 0.5) / 2**32, 2 * math.pi * (x3 + 0.5) / 2**32
    expected = [r01 * math.cos(t01), r01 * math.sin(t01), r23 * math.cos(t23), r23 * math.sin(t23)]
    np.testing.assert_allclose(normals_for_seed(0, 4), expected, rtol=1e-14)
    np.testing.assert_array_equal(latents_for_seeds([0], 4)[0], np.array(expected, dtype=np.float32))


def test_golden_latents() -> None:
    z = latents_for_seeds(GOLDEN_SEEDS, 8)
    assert z.dtype == np.float32
    assert z.shape == (3, 8)
    np.testing.assert_array_equal(z, GOLDEN_Z8)
    np.testing.assert_array_equal(latents_for_seeds(GOLDEN_SEEDS, 8, psi=0.5), GOLDEN_Z8_PSI_05)


@pytest.mark.parametrize("seed", [*GOLDEN_SEEDS, 2**32 - 1, 2**32, 2**63 - 1])
@pytest.mark.parametrize("psi", [None, 0.5, 1.7])
def test_matches_literal_reference(seed: int, psi: float | None) -> None:
    expected = np.array(reference_latent(seed, 13, psi), dtype=np.float32)
    np.testing.assert_array_equal(latents_for_seeds([seed], 13, psi)[0], expected)


def test_prefix_property_and_stream_offsets() -> None:
    """A shorter latent is a prefix of a longer one; normals at any offset match the full stream."""
    full = normals_for_seed(99, 40)
    assert np.array_equal(latents_for_seeds([99], 7)[0], full[:7].astype(np.float32))
    for start in (1, 3, 4, 5, 17):
        np.testing.assert_array_equal(normals_for_seed(99, 11, start=start), full[start : start + 11])


def test_block_counter_high_word() -> None:
    """Block 2^32 uses counter (0, 1, 0, 0): the stream index must not wrap at 2^32 blocks."""
    n = normals_for_seed(5, 4, start=4 * 2**32)
    words = reference_philox4([0, 1, 0, 0], [5, 0], 32)
    r = math.sqrt(-2.0 * math.log((words[0] + 0.5) / 2**32))
    assert n[0] == pytest.approx(r * math.cos(2 * math.pi * (words[1] + 0.5) / 2**32), rel=1e-14)


@pytest.mark.parametrize("psi", [None, 0.3, 1.0])
def test_batch_invariance(psi: float | None) -> None:
    seeds = [7, 2**62 + 12345, 0, 123456789, 7, 2**40]
    batch = latents_for_seeds(seeds, 100, psi)
    for i, seed in enumerate(seeds):
        np.testing.assert_array_equal(batch[i], latents_for_seeds([seed], 100, psi)[0])
    np.testing.assert_array_equal(latents_for_seeds(seeds[::-1], 100, psi), batch[::-1])


@pytest.mark.parametrize("psi", [0.05, 0.5, 0.7, 2.0, 10.0])
def test_truncation_changes_only_large_values(psi: float) -> None:
    seeds = list(range(1000, 1064))
    raw = latents_for_seeds(seeds, 128)
    truncated = latents_for_seeds(seeds, 128, psi)
    small = np.abs(raw) <= psi
    np.testing.assert_array_equal(truncated[small], raw[small])
    assert np.all(np.abs(truncated) <= psi)
    assert np.all(truncated[~small] != raw[~small])


def test_truncation_psi_float32_boundary() -> None:
    """psi as a proto float32 gives it: comparisons use the float32 latent, so |z| <= psi holds exactly."""
    psi = float(np.float32(0.7))
    z = latents_for_seeds(list(range(50)), 64, psi)
    assert float(np.abs(z).max()) <= psi


@pytest.mark.parametrize("psi", [0.0, -1.0, 10.5, math.nan, math.inf])
def test_bad_psi_rejected(psi: float) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        latents_for_seeds([1], 8, psi)
    assert excinfo.value.field == "truncation_psi"


@pytest.mark.parametrize("dim", [64, 512])
def test_tiny_psi_is_refused_up_front(dim: int) -> None:
    floor = latents.min_truncation_psi(dim)
    assert 0.001 < floor < 0.05
    with pytest.raises(InvalidArgument, match=rf"too small for latent size {dim}.*use psi >= ") as excinfo:
        latents_for_seeds([1], dim, floor * 0.9)
    assert excinfo.value.field == "truncation_psi"
    z = latents_for_seeds([1, 2], dim, floor * 1.01)  # just above the floor: works, within bounds
    assert np.all(np.abs(z) <= floor * 1.01)


@pytest.mark.parametrize("bad", [-1, 2**63, 2**64, -(2**63)])
def test_seed_out_of_range_names_field(bad: int) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        latents_for_seeds([3, bad], 8)
    assert excinfo.value.field == "seeds[1]"
    assert "seeds[1]" in str(excinfo.value)
    assert "2^63" in str(excinfo.value)
    with pytest.raises(InvalidArgument) as excinfo:
        eps_for_seed(bad, 4, field="seed")
    assert excinfo.value.field == "seed[0]"


def test_seed_must_be_an_int() -> None:
    with pytest.raises(InvalidArgument, match=r"seeds\[0\]"):
        latents_for_seeds([1.5], 8)  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match=r"seeds\[0\]"):
        latents_for_seeds([True], 8)
    numpy_seed = latents_for_seeds([np.int64(4)], 8)  # type: ignore[list-item]
    np.testing.assert_array_equal(numpy_seed, latents_for_seeds([4], 8))


def test_eps_is_the_untruncated_stream() -> None:
    np.testing.assert_array_equal(eps_for_seed(11, 20), latents_for_seeds([11], 20)[0])
    assert eps_for_seed(11, 20).dtype == np.float32


def test_empty_seed_list() -> None:
    assert latents_for_seeds([], 16).shape == (0, 16)
    assert latents_for_seeds([], 16, 0.5).shape == (0, 16)


def test_distribution_is_standard_normal() -> None:
    z = latents_for_seeds(list(range(256)), 256).astype(np.float64)
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01
    assert abs(float(np.mean(np.abs(z) <= 1.0)) - 0.6827) < 0.01


def textbook_slerp(start: np.ndarray, end: np.ndarray, steps: int) -> np.ndarray:
    """sin((1-t) w)/sin(w) a + sin(t w)/sin(w) b, computed as interpolate() does, ends exact."""
    a, b = start.astype(np.float64), end.astype(np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, np.newaxis]
    omega = math.acos(float(np.clip(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0)))
    path = ((np.sin((1.0 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)).astype(np.float32)
    path[0], path[-1] = a, b
    return path


def at_angle(a: np.ndarray, degrees: float, norm: float) -> np.ndarray:
    """float32 vector of `norm` at `degrees` from `a`, in the plane of a and a seed's latent."""
    u = a.astype(np.float64) / np.linalg.norm(a)
    e = latents_for_seeds([99], a.size)[0].astype(np.float64)
    e -= np.dot(e, u) * u
    e /= np.linalg.norm(e)
    angle = math.radians(degrees)
    return (norm * (math.cos(angle) * u + math.sin(angle) * e)).astype(np.float32)


class TestInterpolate:
    def test_lerp_ends_and_midpoint(self) -> None:
        a = np.array([1.0, 0.0, 2.0], dtype=np.float32)
        b = np.array([3.0, 4.0, -2.0], dtype=np.float32)
        path = interpolate(a, b, 5, InterpolationMode.LERP)
        assert path.shape == (5, 3)
        assert path.dtype == np.float32
        np.testing.assert_array_equal(path[0], a)
        np.testing.assert_array_equal(path[-1], b)
        np.testing.assert_allclose(path[2], (a + b) / 2)

    @pytest.mark.parametrize("mode", [InterpolationMode.SLERP, InterpolationMode.UNSPECIFIED])
    def test_slerp_keeps_norm_of_equal_norm_ends(self, mode: InterpolationMode) -> None:
        a, b = latents_for_seeds([1, 2], 128)
        b = b * (np.linalg.norm(a) / np.linalg.norm(b))
        path = interpolate(a, b, 9, mode)
        np.testing.assert_array_equal(path[0], a)
        np.testing.assert_array_equal(path[-1], b)
        np.testing.assert_allclose(np.linalg.norm(path, axis=1), np.linalg.norm(a), rtol=1e-5)
        lerp_mid = interpolate(a, b, 9, InterpolationMode.LERP)[4]
        assert np.linalg.norm(lerp_mid) < 0.8 * np.linalg.norm(a)  # what slerp avoids

    def test_slerp_quarter_circle(self) -> None:
        path = interpolate(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 3)
        np.testing.assert_allclose(path[1], [math.sqrt(0.5), math.sqrt(0.5)], rtol=1e-6)

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            ([1.0, 2.0], [2.0, 4.0]),
            ([1.0, 2.0], [-1.0, -2.0]),
            ([0.0, 0.0], [1.0, 1.0]),
            ([1.0, 2.0], [1.0, 2.0]),
        ],
    )
    def test_slerp_degenerate_falls_back_to_lerp(self, a: list[float], b: list[float]) -> None:
        slerp = interpolate(np.array(a), np.array(b), 5, InterpolationMode.SLERP)
        lerp = interpolate(np.array(a), np.array(b), 5, InterpolationMode.LERP)
        assert np.all(np.isfinite(slerp))
        np.testing.assert_array_equal(slerp, lerp)

    @pytest.mark.parametrize("dim", [16, 20, 64, 512])
    def test_slerp_of_seed_latents_is_the_textbook_formula(self, dim: int) -> None:
        z = latents_for_seeds(list(range(12)), dim)
        for i in range(len(z)):
            for j in range(i + 1, len(z)):
                np.testing.assert_array_equal(interpolate(z[i], z[j], 9), textbook_slerp(z[i], z[j], 9))

    @pytest.mark.parametrize(("degrees", "ratio"), [(1.0, 1.5), (90.0, 3.0), (120.0, 1.2), (179.5, 1.0)])
    def test_slerp_keeps_the_textbook_formula_where_it_stays_bounded(
        self, degrees: float, ratio: float
    ) -> None:
        a = latents_for_seeds([5], 16)[0]
        b = at_angle(a, degrees, ratio * float(np.linalg.norm(a)))
        np.testing.assert_array_equal(interpolate(a, b, 17), textbook_slerp(a, b, 17))

    @pytest.mark.parametrize(
        ("degrees", "ratio"), [(179.99, 2.0), (179.99, 0.5), (179.0, 2.0), (178.0, 1.25)]
    )
    def test_slerp_between_nearly_opposite_ends_of_different_norms_stays_within_their_norms(
        self, degrees: float, ratio: float
    ) -> None:
        """The textbook formula's points grow as ||a|-|b|| / (2 cos(w/2)) there (at 179.99 degrees,
        z and about -2z: elements over 10^4, which Decode refuses): the norm goes linearly instead,
        along the great circle of the directions."""
        a = latents_for_seeds([1], 16)[0]
        norm_a = float(np.linalg.norm(a))
        b = at_angle(a, degrees, ratio * norm_a)
        norm_b = float(np.linalg.norm(b))
        path = interpolate(a, b, 9).astype(np.float64)
        np.testing.assert_array_equal(path[0], a)
        np.testing.assert_array_equal(path[-1], b)
        t = np.linspace(0.0, 1.0, 9)
        np.testing.assert_allclose(np.linalg.norm(path, axis=1), (1 - t) * norm_a + t * norm_b, rtol=1e-6)
        unit_a, unit_b = a.astype(np.float64) / norm_a, b.astype(np.float64) / norm_b
        # The directions: the textbook path between equal norms, a great circle.
        directions = textbook_slerp(unit_a, unit_b, 9).astype(np.float64)
        np.testing.assert_allclose(path / np.linalg.norm(path, axis=1, keepdims=True), directions, atol=1e-5)

    def test_slerp_between_nearly_opposite_seed_latents_stays_within_their_norms(self) -> None:
        # Two-dimensional seed latents can be nearly opposite: seeds 0 and 1248 at 179.84 degrees.
        z = latents_for_seeds([0, 1248], 2)
        assert np.dot(z[0], z[1]) / np.prod(np.linalg.norm(z, axis=1)) < math.cos(math.radians(179.8))
        norms = np.linalg.norm(interpolate(z[0], z[1], 9), axis=1)
        assert norms.max() <= np.linalg.norm(z, axis=1).max() * (1 + 1e-6), norms

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="steps"):
            interpolate(np.zeros(3), np.ones(3), 1)
        with pytest.raises(ValueError, match="size"):
            interpolate(np.zeros(3), np.ones(4), 3)


def test_proto_enum_numbers_match() -> None:
    pb2 = pytest.importorskip("genserve.v1.genserve_pb2")
    for member in InterpolationMode:
        assert pb2.InterpolationMode.Value(f"INTERPOLATION_MODE_{member.name}") == member.value
    assert latents.RNG_ALGORITHM == "philox4x32-10/box-muller/v1"
