"""Models whose calls go through another model: a style generator's `mapping`, a code prior's
`decoder` (config.json). A READY version of such a model serves only while that model can serve its
calls; `serves` is the one rule for what a model's health key, the whole server's readiness, KServe
ModelReady and `genserve_model_ready` say about it (main.py, kserve.py; docs/server.md)."""

from __future__ import annotations

from genserve_contract.kinds import Kind
from genserve_server import code_sampling, style_sampling
from genserve_server.errors import NotFound
from genserve_server.repository import ModelState, ModelVersion, Repository


def linked_model(mv: ModelVersion) -> tuple[str, str] | None:
    """(config.json field, model name) of the model every call of `mv` goes through: a style
    generator's mapping, a code prior's decoder; None for the other kinds (and before its card)."""
    card = mv.card
    if card is None:
        return None
    if card.kind.styled and mv.config.mapping:
        return "mapping", mv.config.mapping
    if card.kind == Kind.CODE_PRIOR and mv.config.decoder:
        return "decoder", mv.config.decoder
    return None


def every_request_fails(repo: Repository, mv: ModelVersion) -> str:
    """A READY style generator's warning when its mapping does not fit (or is missing), and a
    READY code prior's when its decoder does not: every request would be UNAVAILABLE, while the
    version itself loaded (the other model may be fixed and reloaded on its own). "" otherwise, and
    for a two-level prior's top_prior: a SampleCodes given top_codes does not call it. GetModel and
    ListModels show it; `serves` says no for such a version."""
    card = mv.card
    link = linked_model(mv)
    if mv.state != ModelState.READY or card is None or link is None:
        return ""
    field, name = link
    try:
        linked = repo.get(name)
    except NotFound:
        return f"every request fails: its {field} {name} is not in the repository"
    # What a request uses: the highest READY version (GenerationCore.use), not the card
    # GetModel describes the other model by (a version that failed to load has one too).
    newest = linked.newest_ready()
    found = newest.card if newest is not None else None
    if found is None:
        return f"every request fails: its {field} {name} has no ready version"
    if field == "mapping":
        misfit = style_sampling.mapping_misfit(card, name, found)
    else:
        misfit = code_sampling.decoder_misfit(card, name, found)
    return "" if misfit is None else f"every request fails: {misfit}"


def serves(repo: Repository, mv: ModelVersion | None) -> bool:
    """Whether requests of `mv` can be served: it is READY and, for a style generator or a code
    prior, the model its calls go through is in the repository, has a READY version and fits
    (`every_request_fails` says nothing). None (no such version) does not serve."""
    return mv is not None and mv.state == ModelState.READY and not every_request_fails(repo, mv)
