"""``CaptionMix``: which caption each sample trains on (``--caption``), parsed once and drawn per sample.

``--caption`` takes one of three shapes, all read by :meth:`CaptionMix.parse` into one immutable type:

- a caption name (``long``): every sample trains on that caption;
- ``random``: each sample picks uniformly among the data's captions (with an embedding cache, those the
  cache also holds), named when the mix is resolved against the data (:meth:`CaptionMix.resolve`);
- a weighted mix, a comma-separated list of ``NAME[:WEIGHT]`` items (a missing weight is 1; weights finite
  and > 0, normalised to sum to 1): ``short:0.5,long:0.5``, ``short,long``.

:func:`~.loader.build_loader` also takes a list of names (Python only: the uniform pick of ``random``
restricted to them, :meth:`CaptionMix.among`).

The draw (part of the checkpoint contract: an exact resume re-draws every sample's caption alike). A
sample's caption comes from its own seeded generator (the loader's ``sample_rng(seed, epoch, key,
"caption")``): ``random`` and a list pick with ``rng.choice(names)``; a weighted mix takes the first uniform
``u`` in [0, 1) and picks the first name whose cumulative weight exceeds ``u``; a single name draws nothing.
These two rules stay apart (a mix of equal weights draws differently from ``random``) so that runs and
checkpoints made before this type existed resume exactly. The choice is a function of (seed, epoch, key,
mix) only, whatever the rank, worker or batch a sample lands in.

``text`` keeps the flag's text as given: it is what ``config.json`` records as ``caption`` (and what a
resumed run compares), while ``caption_mix`` records :meth:`CaptionMix.as_dict` of the resolved mix.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from .caption_names import resolve_caption_name

RANDOM = "random"
MIX_EXAMPLE = "'short:0.5,long:0.5'"


class CaptionSpecError(ValueError):
    """A ``--caption`` value that cannot be read or names captions the data does not have."""


@dataclass(frozen=True)
class CaptionMix:
    """Caption names with normalised weights (each > 0, summing to 1), in the order given.

    Attributes:
        names: the captions a sample may train on; empty for ``random`` until :meth:`resolve` names
            the data's.
        weights: one per name, summing to 1 (uniform for ``random`` and lists).
        draw: ``"weighted"`` (first uniform against the cumulative weights) or ``"uniform"``
            (``rng.choice(names)``: ``random`` and lists); see the module docstring.
        text: the flag's text as given (``config.json``'s ``caption``); not compared.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    draw: Literal["weighted", "uniform"] = "weighted"
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.draw not in ("weighted", "uniform"):
            raise CaptionSpecError(f"a caption mix draws 'weighted' or 'uniform', got {self.draw!r}")
        if len(self.names) != len(self.weights) or (not self.names and not self.is_random):
            raise CaptionSpecError(f"a caption mix needs one weight per name, got names {self.names} and "
                                   f"weights {self.weights}")
        if len(set(self.names)) != len(self.names):
            raise CaptionSpecError(f"a caption mix names each caption once, got {list(self.names)}")
        if any(not (math.isfinite(w) and w > 0) for w in self.weights):
            raise CaptionSpecError(f"caption weights must be finite and > 0, got {list(self.weights)}")
        if not self.text:
            object.__setattr__(self, "text", self._shown())

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, flag: str = "--caption") -> CaptionMix:
        """The mix ``text`` asks for (a ``--caption`` value, or the ``caption`` of a saved config.json).
        Raises :class:`CaptionSpecError` naming ``flag`` on bad syntax or weights."""
        if not isinstance(text, str) or not text.strip():
            raise CaptionSpecError(f"{flag} needs a caption name, 'random' or a weighted mix like "
                                   f"{MIX_EXAMPLE}; got {text!r}")
        spec = text.strip()
        if spec == RANDOM:
            return cls((), (), "uniform", text)
        if "," not in spec and ":" not in spec:
            return cls((spec,), (1.0,), "weighted", text)
        return cls.from_weights(_weighted_items(spec, flag), text=text)

    @classmethod
    def from_weights(cls, weights: dict[str, float] | Sequence[tuple[str, float]],
                     text: str = "") -> CaptionMix:
        """Normalise ``{name: weight}`` (any positive scale) into a weighted mix."""
        items = list(weights.items()) if isinstance(weights, dict) else list(weights)
        raw = [float(w) for _, w in items]
        if any(not (math.isfinite(w) and w > 0) for w in raw):
            raise CaptionSpecError(f"caption weights must be finite and > 0, got {raw}")
        total = sum(raw)
        return cls(tuple(str(n) for n, _ in items), tuple(w / total for w in raw), "weighted", text)

    @classmethod
    def uniform(cls, names: Sequence[str]) -> CaptionMix:
        """Equal weights over ``names``, drawn by weight (what ``short,long`` parses to)."""
        return cls.from_weights([(n, 1.0) for n in names])

    @classmethod
    def among(cls, names: Sequence[str], text: str = "") -> CaptionMix:
        """The uniform pick of ``random`` among ``names`` (a list given to ``build_loader``)."""
        names = list(names)
        if not names:
            raise CaptionSpecError("caption as a list must name at least one caption")
        return replace(cls.from_weights([(n, 1.0) for n in names]), draw="uniform", text=text)

    # -- what it is -----------------------------------------------------------------------------------

    @property
    def is_random(self) -> bool:
        """A uniform pick (``random`` or a list)."""
        return self.draw == "uniform"

    @property
    def resolved(self) -> bool:
        """Names are known (``random`` is not until :meth:`resolve`)."""
        return bool(self.names)

    def as_dict(self) -> dict[str, float]:
        """``{name: weight}`` (what the run config records as ``caption_mix``)."""
        return dict(zip(self.names, self.weights))

    def __str__(self) -> str:
        return self.text

    def _shown(self) -> str:
        """``name:weight,...`` (normalised), or the single name, or ``random``."""
        if not self.names:
            return RANDOM
        if self.is_random:
            return f"random among {list(self.names)}"
        if len(self.names) == 1:
            return self.names[0]
        return ",".join(f"{n}:{w:g}" for n, w in self.as_dict().items())

    # -- against the data -----------------------------------------------------------------------------

    def resolve(self, available: Sequence[str], where: str = "the data", *, flag: str = "--caption",
                also_in: Sequence[str] | None = None, also_where: str = "the embedding cache") -> CaptionMix:
        """This mix for data whose captions are ``available``: ``random`` names them (those also in
        ``also_in`` when given), ``short``/``long`` find the official ``shortSV_captions``/
        ``longSV_captions`` keys (:mod:`~.caption_names`), and every name must be a caption of the data.
        Idempotent. Raises :class:`CaptionSpecError` naming ``flag``, the mix and what the data has."""
        available = list(available)
        if not self.names:
            names = [n for n in available if also_in is None or n in also_in]
            if not names:
                raise CaptionSpecError(f"{flag} random: no caption name is both in {where} {available} and "
                                       f"in {also_where} {list(also_in or [])}")
            return replace(CaptionMix.among(names), text=self.text)
        names = tuple(resolve_caption_name(n, available) for n in self.names)
        mix = replace(self, names=names) if names != self.names else self
        unknown = [n for n in names if n not in available]
        if not unknown:
            return mix
        if len(names) == 1 and not self.is_random:
            raise CaptionSpecError(f"{flag} {names[0]!r} is not a caption of {where}; it has {available} "
                                   f"(or use 'random', or a weighted mix like {MIX_EXAMPLE})")
        raise CaptionSpecError(f"{flag} {mix._shown()!r}: {', '.join(repr(n) for n in unknown)} "
                               f"{'is not a caption' if len(unknown) == 1 else 'are not captions'} of "
                               f"{where}; it has {available}")

    # -- the draw -------------------------------------------------------------------------------------

    def choose(self, rng: random.Random) -> str:
        """The name drawn for one sample from its own ``rng`` (see the module docstring)."""
        if not self.names:
            raise CaptionSpecError("caption 'random' draws among the data's captions: resolve the mix "
                                   "against the data first (CaptionMix.resolve)")
        if len(self.names) == 1 and not self.is_random:
            return self.names[0]
        if self.is_random:
            return rng.choice(self.names)
        u = rng.random()
        cumulative = list(itertools.accumulate(self.weights))
        # The last bound is 1 by definition; rounding may leave it a hair below u.
        return self.names[min(bisect.bisect_right(cumulative[:-1], u), len(self.names) - 1)]


def _weighted_items(spec: str, flag: str) -> list[tuple[str, float]]:
    """``(name, weight)`` of each ``NAME[:WEIGHT]`` item of ``spec``, checked."""
    items: list[tuple[str, float]] = []
    for raw in spec.split(","):
        name, sep, weight_text = raw.strip().partition(":")
        name = name.strip()
        if not name:
            raise CaptionSpecError(f"{flag} {spec!r}: item {raw!r} has no caption name; write NAME:WEIGHT "
                                   f"items separated by commas, e.g. {MIX_EXAMPLE}")
        if name == RANDOM:
            raise CaptionSpecError(f"{flag} {spec!r}: 'random' stands alone (uniform over the data's "
                                   "captions); in a mix name the captions")
        weight = _weight(spec, name, weight_text, flag) if sep else 1.0
        if any(n == name for n, _ in items):
            raise CaptionSpecError(f"{flag} {spec!r}: {name!r} is named twice")
        items.append((name, weight))
    return items


def _weight(spec: str, name: str, text: str, flag: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise CaptionSpecError(f"{flag} {spec!r}: the weight of {name!r} must be a number, got "
                               f"{text.strip()!r}") from None
    if not (math.isfinite(weight) and weight > 0):
        raise CaptionSpecError(f"{flag} {spec!r}: the weight of {name!r} must be finite and > 0, got "
                               f"{text.strip()}")
    return weight
