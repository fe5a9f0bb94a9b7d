"""The request id of a call is on the server's log lines about it (docs/metrics.md, "Logs and the
request id"): an operator greps the server's logs for the id a client quotes."""

from __future__ import annotations

import grpc
import numpy as np
from reliability_support import POISON_LATENT
from server_support import TINY_LATENT, ServerProcess

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb


def _poisoned() -> pb.SampleRequest:
    z = np.zeros((1, TINY_LATENT), np.float32)
    z[0, 0] = 2 * POISON_LATENT  # fails the model call of any batch it is in (reliability_support)
    latents = tpb.Tensor(shape=[1, TINY_LATENT], dtype=tpb.DTYPE_FLOAT32, data=z.astype("<f4").tobytes())
    return pb.SampleRequest(model="flaky", latents=latents)


def test_every_call_a_failed_model_call_fails_names_its_request_id_in_the_log(
    channel: grpc.Channel, faulty_server: ServerProcess
) -> None:
    """The runbook (docs/metrics.md, GenserveErrorRateHigh): 'find the request id of a failed call in
    the client and grep the server's JSON logs for it'. The batcher's ERROR line named no request,
    and the boundary's line for an INTERNAL call is throttled like a client's refusals (the first per
    10 s at INFO, the others at DEBUG): the ids of all but one failed call were nowhere in the log."""
    stub = pb_grpc.GenerationServiceStub(channel)
    ids = [f"failed-model-call-{i}" for i in range(4)]
    for rid in ids[:2]:  # one at a time: batches of their own
        try:
            stub.Sample(_poisoned(), metadata=(("x-request-id", rid),), timeout=30)
            raise AssertionError("the poisoned row must fail its model call")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INTERNAL, exc
            assert ("x-request-id", rid) in tuple(exc.trailing_metadata() or ())
    together = [
        stub.Sample.future(_poisoned(), metadata=(("x-request-id", rid),), timeout=30) for rid in ids[2:]
    ]
    for future in together:  # a batch of several calls, each failing
        assert future.exception() is not None and future.code() == grpc.StatusCode.INTERNAL
    log = faulty_server.log()
    missing = [rid for rid in ids if rid not in log]
    assert not missing, f"request ids of failed calls not in the server log: {missing}"
