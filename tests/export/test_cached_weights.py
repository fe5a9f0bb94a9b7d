"""cached_weights: the fitted classifiers' weights kept beside the data (digits, Fashion-MNIST, CycleGAN's
domain A), read back when they fit the net, fitted again whenever the cache cannot be used."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from genserve_export.data.cache_file import cached_weights


def _fitter(seed: int, width: int = 3) -> tuple[list[nn.Module], Callable[[], nn.Module]]:
    """A fit that counts its calls and returns a net of its own with seeded weights."""
    calls: list[nn.Module] = []

    def fit() -> nn.Module:
        torch.manual_seed(seed)
        net = nn.Linear(2, width).eval()
        calls.append(net)
        return net

    return calls, fit


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_first_call_fits_and_keeps_the_weights_the_next_loads_them(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "w.pt"
    calls, fit = _fitter(seed=1)
    fitted = cached_weights(path, nn.Linear(2, 3), fit)
    assert len(calls) == 1 and fitted is calls[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.pt"]  # no temporary left

    fresh = nn.Linear(2, 3)
    loaded = cached_weights(path, fresh, fit)
    assert len(calls) == 1  # not fitted again
    assert loaded is fresh and _same_weights(loaded, fitted)


def test_a_torn_cache_file_is_fitted_again_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(nn.Linear(2, 3).state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    calls, fit = _fitter(seed=2)
    fitted = cached_weights(path, nn.Linear(2, 3), fit)
    assert len(calls) == 1 and fitted is calls[0]
    assert _same_weights(cached_weights(path, nn.Linear(2, 3), fit), fitted)
    assert len(calls) == 1


def test_weights_that_no_longer_fit_the_net_are_fitted_again_into_a_net_of_the_fit(tmp_path: Path) -> None:
    """A changed net (the cache key not bumped): load_state_dict refuses the old weights, maybe after
    copying some of them into the net handed in; the fit's own net is what comes back, and kept."""
    path = tmp_path / "w.pt"
    torch.save(nn.Linear(2, 5).state_dict(), path)
    calls, fit = _fitter(seed=3, width=3)
    handed_in = nn.Linear(2, 3)
    fitted = cached_weights(path, handed_in, fit)
    assert len(calls) == 1 and fitted is calls[0] and fitted is not handed_in
    assert torch.load(path, weights_only=True)["weight"].shape == (3, 2)


def test_a_folder_that_takes_no_new_file_fits_every_time_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    real_open = os.open

    def read_only(name: str | os.PathLike[str], flags: int, *args: object, **kwargs: object) -> int:
        """The folder takes no new file (read-only mount; root ignores a chmod), as the kernel says it."""
        if flags & os.O_CREAT and Path(name).parent == folder:
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    calls, fit = _fitter(seed=4)
    for _ in range(2):
        cached_weights(folder / "w.pt", nn.Linear(2, 3), fit)
    assert len(calls) == 2
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [b"", b"not a torch file", b"\0" * 64, pickle.dumps([1, 2])],
    ids=["empty", "text", "zeros", "other-pickle"],
)
def test_a_cache_file_that_is_no_torch_file_is_fitted_again(tmp_path: Path, content: bytes) -> None:
    """torch.load raised EOFError (an empty file: a full disk, a copy cut at 0), KeyError or
    UnpicklingError (anything else written there), which the three caches let through: the
    classifier, and verify or the build with it, failed until the file was removed by hand."""
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    calls, fit = _fitter(seed=5)
    fitted = cached_weights(path, nn.Linear(2, 3), fit)
    assert len(calls) == 1 and fitted is calls[0]
    assert _same_weights(cached_weights(path, nn.Linear(2, 3), fit), fitted)
    assert len(calls) == 1
