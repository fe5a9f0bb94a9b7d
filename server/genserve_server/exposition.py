"""/metrics rendered byte for byte as prometheus_client renders it, in a fraction of the time.

prometheus_client builds a `Sample` (a dict of labels) for every line, then sorts and escapes each
line's labels again: with ~900 loaded versions (~234,000 lines, 21 MB) a render took 2.2 s of CPU
in the text format and 2.6 s in OpenMetrics (what Prometheus asks for) on the 2-core development
VM, gzip at level 9 another 0.8 s: 3-7 s wall on a busy VM, against Prometheus' default scrape
timeout of 10 s; here 0.2 s (bench/scrape.py, bench/profile.md). The labelled Counter, Gauge and
Histogram families, which hold nearly every line, are written from their children directly: a
child's labels are sorted and escaped once per render (not once per bucket line), a histogram's
`le` values once per family, and counts are formatted through a cache.

Everything this cannot render the same way goes to prometheus_client's own encoder, family by
family: other collectors (process_*, python_*, genserve_gpu_*), `_created` series, exemplars, a
gauge with `set_function`, multiprocess values, names or escapings that would be rewritten, and
`name[]` queries (restricted registries). tests/monitoring/test_exposition.py compares the bytes
with prometheus_client's on a populated registry for every format a scraper can ask for.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client import metrics as client_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.exposition import generate_latest as text_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_encoder
from prometheus_client.utils import floatToGoString as _untyped_float_text

Encoder = Callable[[Any], bytes]

# prometheus_client's number format ('+Inf', 'NaN', '1.5e+06', '-0.0'), with a type.
_float_text: Callable[[float], str] = _untyped_float_text
# Names that every escaping below writes unchanged (no ':', which OpenMetrics' sample names rewrite).
_PLAIN_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Escapings that leave plain names as they are (`dots` doubles underscores; `values` in OpenMetrics
# prefixes sample names with U__).
_PLAIN_ESCAPINGS = (openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8)
_OM_EOF = "# EOF\n"

# floatToGoString of counts (counters, histogram buckets and counts: never -0.0, which a float-keyed
# cache would confuse with 0.0). Bounded: cleared when full.
_COUNT_TEXT: dict[float, str] = {}
_COUNT_TEXT_MAX = 4096


def _count_text(value: float) -> str:
    text = _COUNT_TEXT.get(value)
    if text is None:
        text = _float_text(value)
        if len(_COUNT_TEXT) >= _COUNT_TEXT_MAX:
            _COUNT_TEXT.clear()
        _COUNT_TEXT[value] = text
    return text


def _label_value(value: str) -> str:
    # prometheus_client's label value escaping (the same in both formats).
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def choose(accept: str | None) -> tuple[Encoder, str]:
    """prometheus_client's `choose_encoder`, with its encoder replaced by `render` where that writes
    the same bytes (every format a Prometheus asks for); otherwise the library's encoder. A header
    whose version has a part that is no number ('abc', '1.0.0-rc1'), which the library's comparison
    raises TypeError for, gets the text format, as a header the library does not recognise."""
    try:
        encoder, content_type = choose_encoder(accept or "")
    except TypeError:
        encoder, content_type = choose_encoder("")
    func: Any = encoder
    keywords: dict[str, Any] = {}
    if isinstance(encoder, functools.partial):
        if encoder.args:
            return encoder, content_type
        func, keywords = encoder.func, dict(encoder.keywords)
    escaping = keywords.pop("escaping", openmetrics.UNDERSCORES)
    version = keywords.pop("version", None) if func is openmetrics_encoder else None
    if keywords or escaping not in _PLAIN_ESCAPINGS:
        return encoder, content_type
    if func is text_encoder:
        return functools.partial(render, library=encoder, om=False), content_type
    if func is openmetrics_encoder and version == "1.0.0":
        return functools.partial(render, library=encoder, om=True), content_type
    return encoder, content_type


class _Collected:
    """Metrics already collected, as a registry for prometheus_client's encoders."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def render(registry: Any, *, library: Encoder, om: bool) -> bytes:
    """`library(registry)`'s bytes (prometheus_client's text or OpenMetrics 1.0.0 encoder, as
    `choose` picked it), the labelled families of the registry written here."""
    if type(registry) is not CollectorRegistry or registry._target_info:
        return library(registry)
    with registry._lock:
        collectors = list(registry._collector_to_names)
    out: list[str] = []
    pending: list[Metric] = []  # collected by other collectors: rendered by the library, in order

    def flush() -> None:
        if pending:
            text = library(_Collected(pending)).decode("utf-8")
            out.append(text.removesuffix(_OM_EOF) if om else text)
            pending.clear()

    for collector in collectors:
        lines = _family(collector, om)
        if lines is None:
            pending.extend(collector.collect())
        else:
            flush()
            out.append("".join(lines))
    flush()
    if om:
        out.append(_OM_EOF)
    return "".join(out).encode("utf-8")


def _family(family: Any, om: bool) -> list[str] | None:
    """One Counter, Gauge or Histogram family's lines, or None where the library must render it."""
    kind = type(family)
    if kind not in (Counter, Gauge, Histogram) or values.ValueClass is not values.MutexValue:
        return None
    if kind is not Gauge and client_metrics._use_created:
        return None
    name: str = family._name
    labelnames: tuple[str, ...] = family._labelnames
    if not _PLAIN_NAME.match(name) or not all(
        _PLAIN_NAME.match(label) and not label.startswith("__") for label in labelnames
    ):
        return None
    if family._is_parent():
        with family._lock:
            children = list(family._metrics.items())
    else:
        children = [((), family)]
    doc: str = family._documentation
    if om:
        head = f"# HELP {name} {_label_value(doc)}\n# TYPE {name} {family._type}\n"
        if family._unit:
            head += f"# UNIT {name} {family._unit}\n"
    else:
        doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
        shown = f"{name}_total" if kind is Counter else name
        head = f"# HELP {shown} {doc}\n# TYPE {shown} {family._type}\n"
    lines = [head]
    order = sorted(range(len(labelnames)), key=labelnames.__getitem__)
    names = [labelnames[i] for i in order]
    if kind is Histogram:
        ok = _histogram(lines, name, names, order, children, om)
    else:
        ok = _scalar(lines, name + "_total" if kind is Counter else name, names, order, children, kind, om)
    return lines if ok else None


def _pairs(names: list[str], order: list[int], labelvalues: Any) -> list[str]:
    return [f'{n}="{_label_value(labelvalues[i])}"' for n, i in zip(names, order, strict=True)]


def _scalar(
    lines: list[str],
    sample: str,
    names: list[str],
    order: list[int],
    children: list[Any],
    kind: type,
    om: bool,
) -> bool:
    is_counter = kind is Counter
    # Values are read without their locks: reading a float is atomic, and prometheus_client's reads
    # under one lock per value order nothing across values either.
    for labelvalues, child in children:
        if not is_counter and "_child_samples" in child.__dict__:  # Gauge.set_function
            return False
        value = child._value
        if om and value._exemplar is not None:
            return False
        pairs = _pairs(names, order, labelvalues)
        labels = "{" + ",".join(pairs) + "}" if pairs else ""
        number = _count_text(value._value) if is_counter else _float_text(value._value)
        lines.append(f"{sample}{labels} {number}\n")
    return True


_LE_TEXT: dict[tuple[float, ...], list[str]] = {}


def _histogram(
    lines: list[str], name: str, names: list[str], order: list[int], children: list[Any], om: bool
) -> bool:
    # `le` sorts among the family's label names: the labels before it, then le, then the rest.
    split = sum(1 for n in names if n < "le")
    append = lines.append
    for labelvalues, child in children:
        bounds = tuple(child._upper_bounds)
        les = _LE_TEXT.get(bounds)
        if les is None:
            les = _LE_TEXT[bounds] = [_float_text(b) for b in bounds]
            if len(_LE_TEXT) > 64:
                _LE_TEXT.clear()
        pairs = _pairs(names, order, labelvalues)
        before = ",".join(pairs[:split])
        after = ",".join(pairs[split:])
        opening = f"{name}_bucket{{{before},le=" if before else f"{name}_bucket{{le="
        closing = f",{after}}} " if after else "} "
        acc = 0.0
        cached = _COUNT_TEXT.get
        for le, bucket in zip(les, child._buckets, strict=True):
            if om and bucket._exemplar is not None:
                return False
            acc += bucket._value
            append(f'{opening}"{le}"{closing}{cached(acc) or _count_text(acc)}\n')
        labels = "{" + ",".join(pairs) + "}" if pairs else ""
        append(f"{name}_count{labels} {_count_text(acc)}\n")
        if bounds[0] >= 0:
            append(f"{name}_sum{labels} {_float_text(child._sum._value)}\n")
    return True
