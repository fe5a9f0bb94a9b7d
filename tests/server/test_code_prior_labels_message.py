"""A code prior's labels message for one image with several labels."""

from __future__ import annotations

import pytest

from genserve_server.errors import InvalidArgument
from genserve_server.step_sampler import check_labels


def test_a_code_prior_asked_one_image_with_two_labels_asks_for_one_value() -> None:
    """a27252e made Sample say '1 value (one image)' for one image, not '1 or 1 values'; a code
    prior's SampleCodes still said 'required for ...: 1 or 1 values'."""
    with pytest.raises(InvalidArgument) as excinfo:
        check_labels([1, 2], ["a", "b", "c"], 1, "prior")
    assert "1 or 1 values" not in str(excinfo.value)
    assert "1 value (one image)" in str(excinfo.value)
    with pytest.raises(InvalidArgument, match=r"1 or 3 values"):
        check_labels([1, 2], ["a", "b", "c"], 3, "prior")
