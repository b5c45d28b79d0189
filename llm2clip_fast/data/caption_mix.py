"""A weighted mix of caption names (``--caption short:0.5,long:0.5``) and its per-sample draw.

The spec is a comma-separated list of ``NAME[:WEIGHT]`` items (a missing weight is 1); weights must be
finite and > 0 and are normalised to sum to 1. ``"random"`` (uniform over the data's captions) and a
single name stay what they were: :func:`parse_caption_spec` returns them as plain strings so that
runs using them draw exactly as before.

A sample's caption is drawn from its own seeded generator (the loader's ``sample_rng(seed, epoch, key,
"caption")``): the first uniform ``u`` in [0, 1) picks the first name whose cumulative weight exceeds
``u``. The choice is therefore a function of (seed, epoch, key, mix) only, which keeps runs
reproducible and resumption exact whatever the rank, worker or batch a sample lands in.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


class CaptionSpecError(ValueError):
    """A ``--caption`` value that cannot be read or names captions the data does not have."""


@dataclass(frozen=True)
class CaptionMix:
    """Caption names with normalised weights (each > 0, summing to 1), in the order given."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.weights):
            raise CaptionSpecError(f"a caption mix needs one weight per name, got names {self.names} and "
                                   f"weights {self.weights}")
        if len(set(self.names)) != len(self.names):
            raise CaptionSpecError(f"a caption mix names each caption once, got {list(self.names)}")
        if any(not (math.isfinite(w) and w > 0) for w in self.weights):
            raise CaptionSpecError(f"caption weights must be finite and > 0, got {list(self.weights)}")

    @classmethod
    def from_weights(cls, weights: dict[str, float] | Sequence[tuple[str, float]]) -> CaptionMix:
        """Normalise ``{name: weight}`` (any positive scale) into a mix."""
        items = list(weights.items()) if isinstance(weights, dict) else list(weights)
        raw = [float(w) for _, w in items]
        if any(not (math.isfinite(w) and w > 0) for w in raw):
            raise CaptionSpecError(f"caption weights must be finite and > 0, got {raw}")
        total = sum(raw)
        return cls(tuple(str(n) for n, _ in items), tuple(w / total for w in raw))

    @classmethod
    def uniform(cls, names: Sequence[str]) -> CaptionMix:
        return cls.from_weights([(n, 1.0) for n in names])

    def as_dict(self) -> dict[str, float]:
        """``{name: weight}`` (what the run config records)."""
        return dict(zip(self.names, self.weights))

    def choose(self, rng: random.Random) -> str:
        """The name drawn by one uniform of ``rng`` (see the module docstring)."""
        u = rng.random()
        cumulative = list(itertools.accumulate(self.weights))
        # The last bound is 1 by definition; rounding may leave it a hair below u.
        return self.names[min(bisect.bisect_right(cumulative[:-1], u), len(self.names) - 1)]


def parse_caption_spec(spec: str, flag: str = "--caption") -> str | CaptionMix:
    """``"random"`` or a single name unchanged; a list (``"short:0.5,long:0.5"``, ``"short,long"``) as a
    :class:`CaptionMix`. Raises :class:`CaptionSpecError` naming ``flag`` on bad syntax or weights."""
    if not isinstance(spec, str) or not spec.strip():
        raise CaptionSpecError(f"{flag} needs a caption name, 'random' or a weighted mix like "
                               f"'short:0.5,long:0.5'; got {spec!r}")
    spec = spec.strip()
    if "," not in spec and ":" not in spec:
        return spec
    items: list[tuple[str, float]] = []
    for raw in spec.split(","):
        item = raw.strip()
        name, sep, weight_text = item.partition(":")
        name = name.strip()
        if not name:
            raise CaptionSpecError(f"{flag} {spec!r}: item {raw!r} has no caption name; write NAME:WEIGHT "
                                   "items separated by commas, e.g. 'short:0.5,long:0.5'")
        if name == "random":
            raise CaptionSpecError(f"{flag} {spec!r}: 'random' stands alone (uniform over the data's "
                                   "captions); in a mix name the captions")
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                raise CaptionSpecError(f"{flag} {spec!r}: the weight of {name!r} must be a number, got "
                                       f"{weight_text.strip()!r}") from None
            if not (math.isfinite(weight) and weight > 0):
                raise CaptionSpecError(f"{flag} {spec!r}: the weight of {name!r} must be finite and > 0, "
                                       f"got {weight_text.strip()}")
        if any(n == name for n, _ in items):
            raise CaptionSpecError(f"{flag} {spec!r}: {name!r} is named twice")
        items.append((name, weight))
    return CaptionMix.from_weights(items)


def check_mix_names(mix: CaptionMix, available: Sequence[str], where: str, flag: str = "--caption") -> None:
    """Every name of ``mix`` is in ``available`` (``where`` says whose captions those are)."""
    unknown = [n for n in mix.names if n not in available]
    if unknown:
        shown = ",".join(f"{n}:{w:g}" for n, w in mix.as_dict().items())
        raise CaptionSpecError(f"{flag} {shown!r}: {', '.join(repr(n) for n in unknown)} "
                               f"{'is not a caption' if len(unknown) == 1 else 'are not captions'} of "
                               f"{where}; it has {list(available)}")
