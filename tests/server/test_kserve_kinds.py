"""Which kinds ModelInfer serves, and what it says of the others."""

from __future__ import annotations

import pytest

from genserve_contract.kinds import Kind
from genserve_server.kserve import INFER_KINDS, served_elsewhere


@pytest.mark.parametrize("kind", [k for k in Kind if k.value not in INFER_KINDS])
def test_a_kind_modelinfer_does_not_take_names_the_genserve_rpc_that_serves_it(kind: Kind) -> None:
    # The refusal named only the kinds ModelInfer takes: a client of a code prior, a style or a
    # two-way model learnt what it could not do, not where to go.
    assert "genserve.v1 " in served_elsewhere(kind.value)
