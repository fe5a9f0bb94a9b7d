"""pix2pix-colorize's promise: the output has the input's brightness exactly, only the colour is new."""

from __future__ import annotations

import torch

from genserve_export.recipes import photos_colorize


def test_the_colorizer_keeps_the_inputs_luma_even_where_its_colour_is_out_of_gamut() -> None:
    # A strong chroma (the net's tanh near +-1) on highlights and shadows is outside the RGB cube;
    # clamping R, G, B to [-1, 1] there used to change the luma (up to 9 grey levels on the shipped
    # model's held-out photos) though the card says the output keeps the input's brightness.
    torch.manual_seed(0)
    net = photos_colorize.ColorUNet().eval()
    with torch.no_grad():
        net.out.bias.copy_(torch.tensor([3.0, -3.0]))  # saturated blue-green everywhere
        levels = torch.linspace(-1.0, 1.0, 32)
        image = levels.reshape(1, 1, 1, 32).expand(2, 3, 16, 32).contiguous()
        image[1] = image[1].flip(-1)
        out = net(image)
    assert out.min() >= -1.0 and out.max() <= 1.0
    got = photos_colorize.luma(out)
    want = photos_colorize.luma(image)
    assert (got - want).abs().max().item() * 127.5 < 0.01  # grey levels
    # the colour is still there where the gamut allows it (mid greys)
    assert photos_colorize.chroma(out)[:, :, :, 12:20].abs().max() > 0.3
