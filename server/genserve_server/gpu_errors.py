"""Sticky CUDA errors: failures after which the process's CUDA context is unusable.

After an illegal address, a kernel launch failure or an uncorrectable ECC error every later call on
the context fails too (CUDA's "sticky" errors); the model would stay READY and health SERVING while
every batch fails. The runner classifies each failed model call; a sticky one marks the version
UNAVAILABLE, its health key NOT_SERVING, and stops the process so that the orchestrator restarts it
(repository.Repository.device_lost).
"""

from __future__ import annotations

import re
from typing import Final

# cudaError_t numbers and names that poison the context (CUDA runtime API documentation, "sticky").
STICKY_CUDA_CODES: Final = {
    700: "cudaErrorIllegalAddress",
    701: "cudaErrorLaunchOutOfResources",  # not sticky itself, but ORT reports it mid-graph
    702: "cudaErrorLaunchTimeout",
    714: "cudaErrorHardwareStackError",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    717: "cudaErrorInvalidAddressSpace",
    718: "cudaErrorInvalidPc",
    719: "cudaErrorLaunchFailure",
    214: "cudaErrorECCUncorrectable",
    999: "cudaErrorUnknown",
}
# 701 is a resource error a smaller batch avoids: not a reason to restart the process.
_NOT_STICKY: Final = frozenset({701})

# The numbered form first, so that the report names the code ("CUDA failure 700: ..." in ORT).
_PATTERNS: Final = (
    re.compile(r"\bCUDA[_ ]?(?:failure|error)\s*:?\s*(\d{3})\b", re.IGNORECASE),
    re.compile(r"illegal memory access|an illegal address", re.IGNORECASE),
    re.compile(r"unspecified launch failure", re.IGNORECASE),
    re.compile(r"misaligned address|illegal instruction|hardware stack error", re.IGNORECASE),
    re.compile(r"uncorrectable ECC error", re.IGNORECASE),
    re.compile(
        r"cudaError(?:IllegalAddress|LaunchFailure|LaunchTimeout|HardwareStackError|IllegalInstruction"
        r"|MisalignedAddress|InvalidAddressSpace|InvalidPc|ECCUncorrectable)"
    ),
)


def sticky_cuda_error(exc: BaseException) -> str:
    """The sticky CUDA error `exc` reports ("" when it is none): e.g. "CUDA error 700"."""
    text = str(exc)
    for pattern in _PATTERNS:
        match = pattern.search(text)
        if match is None:
            continue
        if match.groups():
            code = int(match.group(1))
            if code in STICKY_CUDA_CODES and code not in _NOT_STICKY:
                return f"CUDA error {code} ({STICKY_CUDA_CODES[code]})"
            continue
        return match.group(0)
    return ""
