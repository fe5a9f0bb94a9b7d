"""Retry policy: exponential backoff with full jitter, on transient status codes only."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

_NEVER_RETRY = frozenset({grpc.StatusCode.INVALID_ARGUMENT})
# gRPC itself answers RESOURCE_EXHAUSTED "Received message larger than max (N vs. M)" / "Sent
# message larger than max ..." (C core; Go and Java say "grpc: received message larger than max")
# when a message breaks a size limit on either side. The same message breaks it every time, so
# unlike a full queue this RESOURCE_EXHAUSTED is final.
_TOO_LARGE = "message larger than max"
# Request headers (token, request id, ...) over gRPC's hard metadata limit (16 KiB by default):
# "received metadata size exceeds hard limit (value length 20007 vs. 16384)", on every attempt.
# Between the soft and the hard limit ("... exceeds soft limit ...") only a share of the calls is
# refused, so that one stays retryable.
_HEADERS_TOO_LARGE = "metadata size exceeds hard limit"

# A TLS handshake this client's own settings fail (UNAVAILABLE from gRPC): the server's certificate
# is not signed by its CA ("CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
# "... certificate has expired"), does not hold the name checked ("Hostname Verification Check
# failed"; older gRPC: "Peer name X is not in peer certificate"), or the server speaks no TLS
# ("WRONG_VERSION_NUMBER"). Every attempt gets it again. A server closing the connection (its
# refusal of a client certificate, a restart) reads "Socket closed" and stays retryable.
_TLS_REJECTED = (
    "certificate_verify_failed",
    "hostname verification check failed",
    "is not in peer certificate",
    "wrong_version_number",
)


def is_permanent(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failure would repeat on every attempt whatever the policy says."""
    lowered = details.lower()
    return (
        code in _NEVER_RETRY
        or (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and (_TOO_LARGE in lowered or _HEADERS_TOO_LARGE in lowered)
        )
        or (code == grpc.StatusCode.UNAVAILABLE and any(m in lowered for m in _TLS_REJECTED))
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before trying a call again.

    Attempt k (1-based) that failed with a retryable code waits a uniform random time in
    [0, min(max_backoff_s, initial_backoff_s * multiplier**(k-1))] ("full jitter", so many clients
    that failed together do not retry together). The caller's deadline bounds the total.

    A retry after UNAVAILABLE whose channel has no connection (its server went away: a crash, a
    restart, a rolling update) first waits for the channel to connect again, at most
    `reconnect_wait_s` in all for the call (progress of a stream gives it back), within the
    deadline. The channel tries again at least every ChannelConfig.max_reconnect_backoff_s (+20 %
    jitter), so a call made as a restarted server comes back succeeds, and a call to a server that
    stays down fails UNAVAILABLE after its retries and at most `reconnect_wait_s` more (0: never
    wait).
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    # Longer than one reconnect period of ChannelConfig.max_reconnect_backoff_s (2 s, +20 %).
    reconnect_wait_s: float = 3.0
    # RESOURCE_EXHAUSTED: the server refused at admission (queue full), nothing was computed;
    # never a message over gRPC's size limit nor headers over its hard limit (see is_permanent).
    # UNAVAILABLE: the model is loading, the server is draining, or the connection broke.
    retryable_codes: frozenset[grpc.StatusCode] = field(
        default=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                "RetryPolicy needs 0 <= initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if not self.reconnect_wait_s >= 0:  # NaN too
            raise ValueError(f"RetryPolicy.reconnect_wait_s must be >= 0, got {self.reconnect_wait_s}")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")
        bad = self.retryable_codes & _NEVER_RETRY
        if bad:
            # A rejected request is rejected again: retrying it only hides the message.
            raise ValueError(f"RetryPolicy.retryable_codes must not contain {sorted(c.name for c in bad)}")

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Jittered wait after failed attempt number `attempt` (1-based)."""
        try:
            cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        except OverflowError:  # the growth past a float (~1024 doublings) passed any cap long before
            cap = self.max_backoff_s if self.initial_backoff_s > 0 else 0.0
        return (rng or random).uniform(0.0, cap)

    def delay_s(
        self,
        code: grpc.StatusCode,
        attempt: int,
        remaining_s: float | None,
        rng: random.Random | None = None,
        *,
        details: str = "",
    ) -> float | None:
        """Seconds to wait before the next attempt, or None when the error is final.

        Final when the code is not retryable, the error is permanent whatever the code (a message
        over gRPC's size limit, told by the status `details`), the attempts are spent, or the wait
        would outlast the call's deadline (`remaining_s`, None = no deadline).
        """
        if code not in self.retryable_codes or is_permanent(code, details) or attempt >= self.max_attempts:
            return None
        delay = self.backoff_s(attempt, rng)
        if remaining_s is not None and delay >= remaining_s:
            return None
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)
