"""The tensor contract of each model kind (docs/model-repository.md, "Kinds and their tensors")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TensorDecl:
    """One declared input or output: its name, element type and rank."""

    name: str
    dtype: str  # "float32" or "int64"
    rank: int


@dataclass(frozen=True, slots=True)
class KindSpec:
    """What a kind's graph must look like, and which card fields it needs."""

    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    fully_convolutional: bool = False  # dynamic H/W on the image input and output
    image_input: bool = False  # has an `image` input (input_range, input_channels apply)
    latent_input: bool = False  # has a `z` input (latent_dim applies)
    conditional: bool = False  # has a `label` input (class_names applies)


_Z = TensorDecl("z", "float32", 2)
_LABEL = TensorDecl("label", "int64", 1)
_IMAGE = TensorDecl("image", "float32", 4)
# ONNX forbids a graph input and a graph output with the same name, so the image-to-image kinds
# name their output `output_image` (docs/model-repository.md).
_OUTPUT_IMAGE = TensorDecl("output_image", "float32", 4)

KINDS: dict[str, KindSpec] = {
    "generator": KindSpec(inputs=(_Z,), outputs=(_IMAGE,), latent_input=True),
    "conditional_generator": KindSpec(
        inputs=(_Z, _LABEL), outputs=(_IMAGE,), latent_input=True, conditional=True
    ),
    "vae_decoder": KindSpec(inputs=(_Z,), outputs=(_IMAGE,), latent_input=True),
    "vae_encoder": KindSpec(
        inputs=(_IMAGE,),
        outputs=(TensorDecl("mu", "float32", 2), TensorDecl("logvar", "float32", 2)),
        image_input=True,
    ),
    "super_resolution": KindSpec(
        inputs=(_IMAGE,), outputs=(_OUTPUT_IMAGE,), fully_convolutional=True, image_input=True
    ),
    "image_to_image": KindSpec(
        inputs=(_IMAGE,), outputs=(_OUTPUT_IMAGE,), fully_convolutional=True, image_input=True
    ),
}

GENERATIVE_KINDS = frozenset({"generator", "conditional_generator", "vae_decoder"})


def kind_spec(kind: str) -> KindSpec:
    """Return the spec of ``kind``; raises ``KeyError`` naming the known kinds otherwise."""
    try:
        return KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}") from None


def image_output_name(kind: str) -> str | None:
    """Name of the kind's image output (``image`` or ``output_image``); None for the encoder."""
    names = [t.name for t in kind_spec(kind).outputs]
    return next((n for n in names if n in ("image", "output_image")), None)
