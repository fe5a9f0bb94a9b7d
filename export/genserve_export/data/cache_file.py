"""Cache files that several processes may write at once (build-defaults --jobs, pytest -n): the
MNIST array copy and the fitted classifiers beside the data."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from genserve_contract.staging import create_beside

if TYPE_CHECKING:  # torch only where weights are cached: the MNIST array copy needs numpy alone
    from torch import nn

    Net = TypeVar("Net", bound=nn.Module)


def publish_cache_file(path: Path, write: Callable[[BinaryIO], None]) -> bool:
    """Write ``path`` through a temporary file of this call beside it, renamed into place once whole.

    Two processes filling the same cache each rename a whole file of their own, and a reader never
    opens a part of one (a fixed temporary name let the second writer truncate the file the first
    was about to rename). The file has the permissions of any new file (0666 less the umask). False
    where the folder cannot take it (a read-only cache: the caller computes it again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = create_beside(path, suffix=".part")
    except OSError:
        return False
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        tmp.replace(path)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return True


def cached_weights(path: Path, net: Net, fit: Callable[[], Net]) -> Net:
    """``net`` with the weights kept at ``path``, else ``fit()``'s net, whose weights are then kept there.

    Any cache that cannot be used is fitted again: none there or unreadable (OSError), a torn file
    (RuntimeError from torch's zip reader), a file that is no torch file at all (an empty one:
    EOFError; other bytes: KeyError, UnpicklingError, ...), or weights that no longer fit ``net``
    (a changed net: RuntimeError or TypeError from ``load_state_dict``; ``net`` may then hold part
    of them, so ``fit`` must return a net of its own). The new weights are published whole
    (``publish_cache_file``); a folder that takes no new file keeps none, and the next run fits again."""
    import torch

    try:
        net.load_state_dict(torch.load(path, weights_only=True))
    except Exception:  # whatever the file holds, it is only a cache: what fails to load is fitted again
        fitted = fit()
        state = fitted.state_dict()
        publish_cache_file(path, lambda stream: torch.save(state, stream))
        return fitted
    return net
