"""A model's classes as GetModel names them (ModelInfo.class_names): the one check of labels
against them that `sample` and `bulk` (the CLI's and the library's BulkJob) make before any call."""

from __future__ import annotations

from collections.abc import Sequence

from genserve_contract.kinds import Kind

# C0 controls, DEL and C1 controls, each as Python writes it in a repr.
_CONTROL_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}

# The class names a refusal lists, at most.
LISTED_CLASSES = 10


def printable(text: str) -> str:
    """The server's text (a reason quotes the model repository's files) on one line, with no
    terminal escapes: its control characters written as a repr writes them."""
    return text.translate(_CONTROL_ESCAPES)


def class_refusal(model: str, kind: str, class_names: Sequence[str], labels: Sequence[int]) -> str | None:
    """Why `labels` are not all classes of `model`, a model of `kind` whose classes are `class_names`
    (the first label outside [0, len(class_names)), with the model's classes; any label for a model
    of a kind without classes, which the server refuses as 'only conditional models take labels');
    None where they are, or where the answer names no classes of a conditional generator or no kind
    (`kind` "": the server decides). The server refuses such a label only in the call that carries
    it, after the calls before it (their work thrown away), naming an index of that call's labels; a
    bulk job's stream is refused once its folder is made. The caller prefixes `command: --flag: `."""
    classes = len(class_names)
    if labels and not classes and kind and kind != Kind.CONDITIONAL_GENERATOR:
        return f"{model} is a {kind} without classes: it takes no labels"
    for label in labels if classes else ():
        if not 0 <= label < classes:
            names = ", ".join(class_names[:LISTED_CLASSES]) + (", ..." if classes > LISTED_CLASSES else "")
            return f"{model} has no class {label}: its classes are [0, {classes}) ({printable(names)})"
    return None
