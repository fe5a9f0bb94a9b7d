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


def test_a_class_conditional_prior_sent_no_labels_says_none_were_given_not_got_0() -> None:
    """SampleCodes without labels to a class-conditional prior said 'labels: required for prior: 1
    value (one image) in [0, 3), got 0': the count of labels read as a label 0 sent and refused
    (0 being a class of the range it quoted), and a wrong count of labels was 'required' too. No
    labels says none were given; a wrong count says how many values it got."""
    with pytest.raises(InvalidArgument) as excinfo:
        check_labels([], ["a", "b", "c"], 1, "prior")
    message = str(excinfo.value)
    assert "got 0" not in message, message
    assert "required for prior" in message and "got none" in message, message
    with pytest.raises(InvalidArgument) as excinfo:
        check_labels([0, 0], ["a", "b", "c"], 3, "prior")
    message = str(excinfo.value)
    assert "required" not in message and "got 2 values" in message, message
