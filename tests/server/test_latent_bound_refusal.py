"""Explicit latents past |z| <= 1e4 are refused naming the field and the value that broke the bound."""

from __future__ import annotations

import numpy as np
import pytest

from genserve_server import validate
from genserve_server.errors import InvalidArgument


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_latent_just_past_the_bound_is_refused_showing_a_value_past_it(sign: float) -> None:
    """The float32 after 1e4 (10000.000977) was refused as 'must satisfy |z| <= 10000, got 10000':
    a refusal whose value seems to meet its own bound. The value is printed to float32 precision."""
    z = np.zeros((2, 4), "<f4")
    z[1, 2] = sign * np.nextafter(np.float32(1e4), np.float32(2e4))
    with pytest.raises(InvalidArgument) as excinfo:
        validate.latent_bytes(z.tobytes(), z.shape, 4, "latents")
    message = str(excinfo.value)
    assert message.startswith("latents: values must satisfy |z| <= 10000, got "), message
    shown = float(message.rsplit("got ", 1)[1].split()[0])
    assert shown > 1e4, message
    # At the bound itself the latents are taken.
    z[1, 2] = sign * 1e4
    assert validate.latent_bytes(z.tobytes(), z.shape, 4, "latents")[1, 2] == sign * 1e4
