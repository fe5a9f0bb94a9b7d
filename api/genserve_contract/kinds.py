"""Model kinds: what each kind's graph takes and gives, and which card fields apply to it.

Adding a kind is one `Kind` member plus one `_SPECS` entry here, and its pipeline in the server.
Everything else (export's checks, the server's card rules and graph check, warm-up inputs) reads the
properties below instead of comparing kind names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class TensorDecl:
    """One declared input or output: its name, element type and rank."""

    name: str
    dtype: str  # "float32" or "int64"
    rank: int


Z = TensorDecl("z", "float32", 2)
LABEL = TensorDecl("label", "int64", 1)
IMAGE = TensorDecl("image", "float32", 4)
# ONNX forbids a graph input and a graph output with the same name, so the image-to-image kinds
# name their output `output_image` (docs/model-repository.md).
OUTPUT_IMAGE = TensorDecl("output_image", "float32", 4)
MU = TensorDecl("mu", "float32", 2)
LOGVAR = TensorDecl("logvar", "float32", 2)
IMAGE_OUTPUT_NAMES = (IMAGE.name, OUTPUT_IMAGE.name)
# Discrete codes (VQ-VAE): int64 [N, H, W] grids of codebook indices. A prior's unfilled positions
# hold 0 (a valid index: its masked convolutions never read them, and an embedding lookup never
# goes out of range). TOP_CODES: the coarse grid a bottom prior and a two-level decoder take.
CODES = TensorDecl("codes", "int64", 3)
TOP_CODES = TensorDecl("top_codes", "int64", 3)
# A prior's logits for every position: float32 [N, K, H, W] (K = codebook_size).
LOGITS = TensorDecl("logits", "float32", 4)
# Style-based generators (StyleGAN) are two graphs: a style_mapping z [N, Z] -> w [N, w_dim], and a
# style_generator (the synthesis network) ws [N, num_layers, w_dim] -> image, one w per layer, its
# noise fixed inside the graph so that an image is a pure function of its ws. The server works in
# w space between them: truncation toward the card's w_avg, style mixing, interpolation.
W = TensorDecl("w", "float32", 2)
WS = TensorDecl("ws", "float32", 3)
# Two-way translators (CycleGAN): one graph holding both generators, `direction` int64 [N] picks
# which runs (0 = A->B, 1 = B->A; the card's `domains` names A and B). Every row of one call has the
# same direction (the graph reads row 0's, through an ONNX If, so only one generator runs): the
# server batches rows by direction.
DIRECTION = TensorDecl("direction", "int64", 1)
DIRECTIONS: tuple[str, ...] = ("A_TO_B", "B_TO_A")  # direction values 0 and 1

# The config.json batching export writes per kind family (the server's own defaults for absent
# fields are config.BatchingConfig's). Generators are cheap per item and served to many small
# requests: batch widely with a short window. Image-input kinds carry large tensors (tiles,
# photos): smaller batches, a longer window.
_LATENT_BATCHING: Mapping[str, Any] = MappingProxyType(
    {
        "max_batch_size": 64,
        "max_queue_delay_s": 0.004,
        "preferred_batch_sizes": (1, 8, 64),
        "max_queue_size": 1024,
    }
)
_IMAGE_BATCHING: Mapping[str, Any] = MappingProxyType(
    {
        "max_batch_size": 16,
        "max_queue_delay_s": 0.005,
        "preferred_batch_sizes": (1, 4, 16),
        "max_queue_size": 256,
    }
)


@dataclass(frozen=True, slots=True)
class KindSpec:
    """What a kind's graph must look like, and the batching export writes for it."""

    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    # Dynamic H/W on the image input and output (no image_size; size_multiple, min_size apply).
    fully_convolutional: bool = False
    # Output = scale_factor x input, served in tiles (scale_factor, tile_size, tile_overlap apply).
    tiled: bool = False
    export_batching: Mapping[str, Any] = field(default_factory=lambda: _LATENT_BATCHING)
    # Inputs a graph of this kind may take besides `inputs`; the card says which it has (code kinds:
    # `label` where class_names is set, `top_codes` where top_grid is set).
    optional_inputs: tuple[TensorDecl, ...] = ()
    # The names of `inputs` and `outputs`, made once: the server asks (Kind.conditional, .styled) on
    # every request.
    input_names: tuple[str, ...] = field(init=False)
    output_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_names", tuple(t.name for t in self.inputs))
        object.__setattr__(self, "output_names", tuple(t.name for t in self.outputs))


class Kind(enum.StrEnum):
    """A model kind. A StrEnum: `Kind("generator")` parses, and a member equals its name string."""

    GENERATOR = "generator"
    CONDITIONAL_GENERATOR = "conditional_generator"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    SUPER_RESOLUTION = "super_resolution"
    IMAGE_TO_IMAGE = "image_to_image"
    CODE_PRIOR = "code_prior"
    CODE_DECODER = "code_decoder"
    STYLE_MAPPING = "style_mapping"
    STYLE_GENERATOR = "style_generator"
    TWO_WAY_TRANSLATOR = "two_way_translator"

    @classmethod
    def parse(cls, value: object) -> Kind:
        """The kind named `value`; ValueError naming the known kinds otherwise."""
        if isinstance(value, str) and value in KIND_NAMES:
            return cls(value)
        raise ValueError(f"unknown kind {value!r}; known kinds: {', '.join(KIND_NAMES)}")

    @property
    def spec(self) -> KindSpec:
        return _SPECS[self]

    @property
    def inputs(self) -> tuple[TensorDecl, ...]:
        return self.spec.inputs

    @property
    def outputs(self) -> tuple[TensorDecl, ...]:
        return self.spec.outputs

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.spec.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.spec.output_names

    @property
    def optional_inputs(self) -> tuple[TensorDecl, ...]:
        return self.spec.optional_inputs

    @property
    def takes_codes(self) -> bool:
        """Input `codes` (grid, codebook_size apply): the VQ kinds."""
        return CODES.name in self.input_names

    @property
    def autoregressive(self) -> bool:
        """Output `logits`: a prior served by the step scheduler (SampleCodes), not by batches."""
        return LOGITS.name in self.output_names

    @property
    def takes_latent(self) -> bool:
        """Input `z` (latent_dim applies): the kinds that answer Sample."""
        return Z.name in self.input_names

    @property
    def conditional(self) -> bool:
        """Input `label` (class_names applies)."""
        return LABEL.name in self.input_names

    @property
    def takes_image(self) -> bool:
        """Input `image` (input_range, input_channels apply; batches bounded by pixels)."""
        return IMAGE.name in self.input_names

    @property
    def gives_latent(self) -> bool:
        """Outputs `mu` and `logvar` (the encoder; latent_dim is mu's length)."""
        return MU.name in self.output_names

    @property
    def fully_convolutional(self) -> bool:
        return self.spec.fully_convolutional

    @property
    def tiled(self) -> bool:
        return self.spec.tiled

    @property
    def image_output_name(self) -> str | None:
        """`image` or `output_image`; None for a kind with no image output (the encoder)."""
        return next((n for n in self.output_names if n in IMAGE_OUTPUT_NAMES), None)

    @property
    def maps_latent(self) -> bool:
        """Output `w` (style_mapping: z -> w; w_dim applies). Served only through the style_generator
        that names it (config.json `mapping`), never on its own."""
        return W.name in self.output_names

    @property
    def styled(self) -> bool:
        """Input `ws` (style_generator: w_dim, num_layers, w_avg apply; config.json `mapping` names its
        style_mapping)."""
        return WS.name in self.input_names

    @property
    def two_way(self) -> bool:
        """Input `direction` (two_way_translator: `domains` applies; Translate's direction picks the
        generator)."""
        return DIRECTION.name in self.input_names

    @property
    def translates(self) -> bool:
        """Answers Translate: image in, same-size image out, untiled (image_to_image, two_way_translator)."""
        return self.takes_image and self.image_output_name == OUTPUT_IMAGE.name and not self.tiled

    @property
    def answers_sample(self) -> bool:
        """Images from seeds or latents (Sample, SampleStream, Interpolate): the kinds that take z and
        give an image, and the style generator (z through its mapping)."""
        return self.image_output_name is not None and (self.takes_latent or self.styled)

    @property
    def has_latent_dim(self) -> bool:
        """Whether card.json's latent_dim applies (a latent goes in or comes out; a style generator's
        is its mapping's z)."""
        return self.takes_latent or self.gives_latent or self.styled


_SPECS: Mapping[Kind, KindSpec] = MappingProxyType(
    {
        Kind.GENERATOR: KindSpec(inputs=(Z,), outputs=(IMAGE,)),
        Kind.CONDITIONAL_GENERATOR: KindSpec(inputs=(Z, LABEL), outputs=(IMAGE,)),
        Kind.VAE_DECODER: KindSpec(inputs=(Z,), outputs=(IMAGE,)),
        Kind.VAE_ENCODER: KindSpec(inputs=(IMAGE,), outputs=(MU, LOGVAR)),
        Kind.SUPER_RESOLUTION: KindSpec(
            inputs=(IMAGE,),
            outputs=(OUTPUT_IMAGE,),
            fully_convolutional=True,
            tiled=True,
            export_batching=_IMAGE_BATCHING,
        ),
        Kind.IMAGE_TO_IMAGE: KindSpec(
            inputs=(IMAGE,),
            outputs=(OUTPUT_IMAGE,),
            fully_convolutional=True,
            export_batching=_IMAGE_BATCHING,
        ),
        # batching.max_batch_size of a prior is its row budget: the rows of one step's call.
        Kind.CODE_PRIOR: KindSpec(inputs=(CODES,), outputs=(LOGITS,), optional_inputs=(LABEL, TOP_CODES)),
        Kind.CODE_DECODER: KindSpec(inputs=(CODES,), outputs=(IMAGE,), optional_inputs=(TOP_CODES,)),
        Kind.STYLE_MAPPING: KindSpec(inputs=(Z,), outputs=(W,)),
        Kind.STYLE_GENERATOR: KindSpec(inputs=(WS,), outputs=(IMAGE,)),
        Kind.TWO_WAY_TRANSLATOR: KindSpec(
            inputs=(IMAGE, DIRECTION),
            outputs=(OUTPUT_IMAGE,),
            fully_convolutional=True,
            export_batching=_IMAGE_BATCHING,
        ),
    }
)
if set(_SPECS) != set(Kind):  # a new member without its declaration fails at import, not at serve time
    raise AssertionError(f"kinds without a KindSpec: {sorted(set(Kind) - set(_SPECS))}")

KIND_NAMES: tuple[str, ...] = tuple(k.value for k in Kind)
LATENT_KINDS: tuple[Kind, ...] = tuple(k for k in Kind if k.takes_latent)
# The kinds that answer Sample (the latent kinds with an image output, and the style generator).
SAMPLE_KINDS: tuple[Kind, ...] = tuple(k for k in Kind if k.answers_sample)
IMAGE_INPUT_KINDS: tuple[Kind, ...] = tuple(k for k in Kind if k.takes_image)
TRANSLATE_KINDS: tuple[Kind, ...] = tuple(k for k in Kind if k.translates)


def image_shape_fits(
    shape: Sequence[int | str | None], channels: int | None, image_size: Sequence[int] | None
) -> bool:
    """Whether an image output's shape is the card's NCHW: [N, channels, H, W], H x W its image_size
    where it has one. Unknown dims (symbolic, or not positive: a graph's declared shape) are not
    compared. The server serves images by these card fields (export's verify and the server's load
    both check them): an NHWC output, or a wrong channel count or size, would scramble or mislabel
    every image."""
    want = [None, channels, *(image_size or (None, None))]
    return len(shape) == len(want) and all(
        not isinstance(got, int) or got <= 0 or w is None or got == w
        for got, w in zip(shape[1:], want[1:], strict=True)
    )
