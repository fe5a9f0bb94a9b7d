"""The networks of ``vqvae-digits``: a two-level VQ-VAE (VQ-VAE-2, Razavi et al. 2019) and gated PixelCNN
priors (van den Oord et al. 2016) over its code grids, small enough to train on 2 CPU cores.

Encoder: image 28x28 -> bottom features 14x14 -> top features 7x7 -> top codes (K_TOP); the top codes,
decoded back to 14x14, join the bottom features -> bottom codes (K_BOTTOM). Decoder: top codes
(upsampled) + bottom codes -> image. Codebooks are updated by exponential moving averages of the
vectors assigned to them (VQ-VAE appendix), dead codes restarted from encoder outputs. In training a
second decoder reconstructs the image from the top codes alone (``TopOnlyDecoder``, not exported), so
that the top grid holds the digit's shape and the bottom grid its detail.

Priors see a grid with unfilled positions (kinds.CODES: they hold 0) and give the logits of every
position at once; the causal structure (a vertical stack that sees the rows above, shifted down one
row into a horizontal stack that sees the positions to the left) makes position p's logits depend on
positions < p only, so one call serves rows at different positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CODE_DIM = 16  # codebook vector length (both levels)
WIDTH = 32  # VQ-VAE channels


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation with EMA codebook updates and dead-code restarts."""

    embedding: torch.Tensor
    cluster_size: torch.Tensor
    embed_sum: torch.Tensor
    initialised: torch.Tensor

    def __init__(self, k: int, dim: int = CODE_DIM, decay: float = 0.99) -> None:
        super().__init__()
        self.k, self.dim, self.decay = k, dim, decay
        self.register_buffer("embedding", torch.randn(k, dim) * 0.1)
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D, H, W] -> int64 [N, H, W]: the nearest codebook vector's index."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        distances = (
            (flat * flat).sum(1, keepdim=True)
            - 2.0 * flat @ self.embedding.t()
            + (self.embedding * self.embedding).sum(1)[None, :]
        )
        return distances.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 [N, H, W] -> [N, D, H, W]."""
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(straight-through quantised z, codes, commitment loss)."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)
        if self.training and not bool(self.initialised):
            # start from encoder outputs: random init leaves most codes unused from the first step
            self.embedding.copy_(flat[torch.randperm(len(flat))[: self.k]])
            self.embed_sum.copy_(self.embedding)
            self.initialised.fill_(True)
        codes = self.codes(z)
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(codes.reshape(-1), self.k).to(flat.dtype)
                self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                size = (self.cluster_size + 1e-5) / (n + self.k * 1e-5) * n
                self.embedding.copy_(self.embed_sum / size[:, None])
        quantised = self.lookup(codes)
        commitment = F.mse_loss(z, quantised.detach())
        return z + (quantised - z).detach(), codes, commitment

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor, threshold: float = 1.0) -> int:
        """Codes whose EMA usage fell below ``threshold`` take random encoder outputs of this batch."""
        dead = (self.cluster_size < threshold).nonzero().flatten()
        if len(dead):
            flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
            picked = flat[torch.randint(len(flat), (len(dead),))]
            self.embedding[dead] = picked
            self.embed_sum[dead] = picked
            self.cluster_size[dead] = 1.0
        return len(dead)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


def _top_codes_to_14x14(width: int) -> list[nn.Module]:
    """Quantised top codes [N, CODE_DIM, 7, 7] -> features [N, width, 14, 14]: the VQ-VAE's path from
    the top grid to the bottom one, and the first half of TopOnlyDecoder (separate weights)."""
    return [
        nn.Conv2d(CODE_DIM, width, 3, padding=1),
        ResBlock(width),
        nn.ReLU(),
        nn.ConvTranspose2d(width, width, 4, 2, 1),
    ]


class VqVae2(nn.Module):
    """Two-level VQ-VAE for 28x28 gray digits: top codes 7x7 (k_top), bottom codes 14x14 (k_bottom)."""

    def __init__(self, k_top: int, k_bottom: int, width: int = WIDTH) -> None:
        super().__init__()
        self.encode_bottom = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), ResBlock(width)
        )  # 14x14
        self.encode_top = nn.Sequential(
            nn.Conv2d(width, width, 4, 2, 1), ResBlock(width), nn.ReLU(), nn.Conv2d(width, CODE_DIM, 1)
        )  # 7x7
        # 14x14, joins the bottom features before bottom quantisation
        self.top_to_bottom = nn.Sequential(*_top_codes_to_14x14(width))
        self.pre_bottom = nn.Conv2d(2 * width, CODE_DIM, 1)
        self.upsample_top = nn.ConvTranspose2d(CODE_DIM, CODE_DIM, 4, 2, 1)
        self.decode = nn.Sequential(
            nn.Conv2d(2 * CODE_DIM, width, 3, padding=1),
            ResBlock(width),
            ResBlock(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )  # 28x28 logits
        self.quantise_top = VectorQuantizer(k_top)
        self.quantise_bottom = VectorQuantizer(k_bottom)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q_top, q_bottom, top codes, bottom codes, commitment loss, z_top, z_bottom)."""
        h = self.encode_bottom(image)
        z_top = self.encode_top(h)
        q_top, top, commit_top = self.quantise_top(z_top)
        z_bottom = self.pre_bottom(torch.cat([h, self.top_to_bottom(q_top)], dim=1))
        q_bottom, bottom, commit_bottom = self.quantise_bottom(z_bottom)
        return q_top, q_bottom, top, bottom, commit_top + commit_bottom, z_top, z_bottom

    def decode_logits(self, q_top: torch.Tensor, q_bottom: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.decode(torch.cat([self.upsample_top(q_top), q_bottom], dim=1))
        return logits

    def decode_codes(self, codes: torch.Tensor, top_codes: torch.Tensor) -> torch.Tensor:
        """codes [N, 14, 14], top_codes [N, 7, 7] -> image [N, 1, 28, 28] in [0, 1]."""
        q_top, q_bottom = self.quantise_top.lookup(top_codes), self.quantise_bottom.lookup(codes)
        return torch.sigmoid(self.decode_logits(q_top, q_bottom))


class TopOnlyDecoder(nn.Module):
    """Training only: top codes alone -> image logits [N, 1, 28, 28]. Its reconstruction loss makes
    the top grid carry the digit's shape; without it the bottom codes (14x14 x 6 bits) can hold the
    whole image, and in some trainings the top grid collapsed to one "background" code at 78 % of
    positions, which left the global structure to the bottom prior's ~5-row view (export/README.md,
    "Why the VQ-VAE-2's class accuracy moved between builds")."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_top_codes_to_14x14(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )  # 7x7 -> 14x14 -> 28x28

    def forward(self, q_top: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.body(q_top)
        return logits


class CodeDecoder(nn.Module):
    """The served code_decoder: (codes, top_codes) -> image."""

    def __init__(self, vqvae: VqVae2) -> None:
        super().__init__()
        self.vqvae = vqvae

    def forward(self, codes: torch.Tensor, top_codes: torch.Tensor) -> torch.Tensor:
        return self.vqvae.decode_codes(codes, top_codes)


class CodeEncoder(nn.Module):
    """image [N, 1, 28, 28] in [0, 1] -> (codes [N, 14, 14], top_codes [N, 7, 7]), int64."""

    def __init__(self, vqvae: VqVae2) -> None:
        super().__init__()
        self.vqvae = vqvae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, top, bottom, *_ = self.vqvae.encode(image)
        return bottom, top


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def _shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i gets row i - 1 (row 0 gets zeros)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, : x.shape[2], :]


class GatedLayer(nn.Module):
    """One gated PixelCNN layer (3x3 receptive step): vertical stack (rows <= i), horizontal stack
    (row i, columns < j in the first layer, <= j after), conditioned on a per-class bias and, for a
    bottom prior, a per-position map computed from the top grid."""

    def __init__(self, c: int, first: bool, n_classes: int, cond_channels: int) -> None:
        super().__init__()
        self.first = first
        self.vertical = nn.Conv2d(c, 2 * c, (2, 3))
        self.horizontal = nn.Conv2d(c, 2 * c, (1, 2))
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.label = nn.Embedding(n_classes, 4 * c)
        self.cond = nn.Conv2d(cond_channels, 4 * c, 1) if cond_channels else None

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, label: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = h.shape[3]
        v_pre = self.vertical(F.pad(v, (1, 1, 1, 0)))  # rows i-1..i, columns j-1..j+1
        # first layer: columns j-2..j-1 (never the position itself); later: j-1..j
        h_in = F.pad(h, (2, 0, 0, 0))[:, :, :, : width + 1] if self.first else F.pad(h, (1, 0, 0, 0))
        h_pre = self.horizontal(h_in) + self.v_to_h(_shift_down(v_pre))
        bias = self.label(label)[:, :, None, None]
        if self.cond is not None and cond is not None:
            bias = bias + self.cond(cond)
        bias_v, bias_h = bias.chunk(2, dim=1)
        v_out = _gate(v_pre + bias_v)
        h_out = self.h_out(_gate(h_pre + bias_h))
        return v_out, h_out if self.first else h + h_out


class GatedPixelCNN(nn.Module):
    """Class-conditional gated PixelCNN over a k-code grid: (codes, label[, top_codes]) -> logits
    [N, k, H, W]. With ``top_k`` it is a bottom prior: the top grid (half the size) is embedded,
    upsampled x2 and conditions every layer."""

    def __init__(self, k: int, c: int, layers: int, n_classes: int, top_k: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(k, c)
        self.top: nn.Module | None = None
        if top_k:
            self.top_embed = nn.Embedding(top_k, c)
            self.top = nn.Sequential(
                nn.ConvTranspose2d(c, c, 2, 2),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1),
            )
        self.layers = nn.ModuleList(
            GatedLayer(c, i == 0, n_classes, c if top_k else 0) for i in range(layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, 2 * c, 1), nn.ReLU(), nn.Conv2d(2 * c, k, 1))

    def forward(
        self, codes: torch.Tensor, label: torch.Tensor, top_codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)
        cond = None
        if self.top is not None and top_codes is not None:
            cond = self.top(self.top_embed(top_codes).permute(0, 3, 1, 2))
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, label, cond)
        logits: torch.Tensor = self.head(h)
        return logits
