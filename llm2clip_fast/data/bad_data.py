"""Bad-data accounting: bad samples are skipped and counted, never silently lost.

A sample is bad when its image is missing, truncated or undecodable, or one of its captions is empty.
The tracker remembers every offending key with its reason, counts visits, and raises
:class:`BadDataError` once the bad fraction passes ``max_fraction``. During a pass the decision waits
until at least ``min_samples`` samples were seen, so one bad sample among the first few does not stop a
long run; at the end of every pass (epoch) :meth:`BadDataTracker.check_end_of_epoch` enforces the
fraction whatever the number of samples, so a small source cannot train on mostly bad data. Samples
lost without a key (the unreadable tail of a truncated WebDataset shard) count through
:meth:`BadDataTracker.add_lost`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_MAX_FRACTION = 0.01
DEFAULT_MIN_SAMPLES = 100
_KEYS_SHOWN = 20


class BadDataError(RuntimeError):
    """Raised when the fraction of bad samples passes the policy's threshold."""


class BadSampleError(Exception):
    """One sample cannot be used; ``reason`` says why. Caught by sources and loaders, never escapes them."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class BadDataPolicy:
    """When bad data stops a run.

    Args:
        max_fraction: stop when bad visits / visits exceeds this (default 0.01 = 1%).
        min_samples: decide only once at least this many samples were seen (default 100).
    """

    max_fraction: float = DEFAULT_MAX_FRACTION
    min_samples: int = DEFAULT_MIN_SAMPLES

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {self.max_fraction!r}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples!r}")


def as_policy(bad_data: BadDataPolicy | float | None) -> BadDataPolicy:
    """Accept a policy, a bare max fraction, or None (the default policy)."""
    if bad_data is None:
        return BadDataPolicy()
    if isinstance(bad_data, BadDataPolicy):
        return bad_data
    if isinstance(bad_data, (int, float)) and not isinstance(bad_data, bool):
        return BadDataPolicy(max_fraction=float(bad_data))
    raise TypeError(
        f"bad_data must be a BadDataPolicy, a float fraction or None, got {type(bad_data).__name__}"
    )


class BadDataTracker:
    """Counts samples seen and bad samples skipped (with reasons), and enforces a :class:`BadDataPolicy`.

    Counts are cumulative over the tracker's life (all epochs of a loader): ``seen`` and ``bad`` count
    visits, ``bad_keys`` holds each offending key once with its latest reason.
    """

    def __init__(self, policy: BadDataPolicy | float | None = None):
        self.policy = as_policy(policy)
        self.seen = 0
        self.bad = 0
        self.bad_keys: dict[str, str] = {}
        self.notes: list[str] = []  # problems not tied to one key (e.g. a truncated shard)
        self.lost = 0  # samples known to exist but unreadable, without a key (counted in seen and bad)

    def add_seen(self, n: int = 1) -> None:
        self.seen += n

    def add_bad(self, key: str, reason: str) -> None:
        """Record one bad visit; the caller also counts it in ``seen``."""
        self.bad += 1
        self.bad_keys[key] = reason

    def add_note(self, note: str) -> None:
        """Record a problem not tied to one key (reported by :meth:`summary`); each note is kept once."""
        if note not in self.notes:
            self.notes.append(note)

    def add_lost(self, n: int, note: str) -> None:
        """Count ``n`` samples lost without a key (e.g. a truncated shard's tail) as seen and bad."""
        if n > 0:
            self.lost += n
            self.seen += n
            self.bad += n
        self.add_note(note)

    def merge(self, seen: int, bad: Iterable[tuple[str, str]]) -> None:
        """Fold in counts gathered elsewhere (a DataLoader worker): ``seen`` visits, ``bad`` (key, reason)."""
        self.seen += seen
        for key, reason in bad:
            self.add_bad(key, reason)

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def exceeded(self) -> bool:
        return self.seen >= self.policy.min_samples and self.fraction > self.policy.max_fraction

    def check(self) -> None:
        """Raise :class:`BadDataError` when the policy's threshold is passed (after ``min_samples``)."""
        if self.exceeded():
            raise BadDataError(self._too_many())

    def check_end_of_epoch(self) -> None:
        """Raise :class:`BadDataError` when the bad fraction passes the threshold, however few samples
        were seen: called when a pass over the data ends."""
        if self.seen and self.fraction > self.policy.max_fraction:
            raise BadDataError(self._too_many())

    def _too_many(self) -> str:
        lost = f" ({self.lost} lost in damaged shards)" if self.lost else ""
        notes = "".join(f"; note: {n}" for n in self.notes)
        return (f"{self.bad} of {self.seen} samples were bad{lost} ({self.fraction:.2%} > "
                f"{self.policy.max_fraction:.2%} allowed); {self._keys_text()}{notes}. Fix the data or raise "
                "the threshold (--max-bad-fraction on the command line, "
                "bad_data=BadDataPolicy(max_fraction=...) in Python).")

    def _keys_text(self) -> str:
        items = list(self.bad_keys.items())
        shown = "; ".join(f"{k}: {r}" for k, r in items[:_KEYS_SHOWN])
        more = f" (and {len(items) - _KEYS_SHOWN} more)" if len(items) > _KEYS_SHOWN else ""
        return f"bad keys: {shown}{more}" if items else "no bad keys"

    def summary(self) -> str:
        """One human-readable paragraph: counts, fraction and the offending keys with reasons."""
        return (
            f"bad data: {self.bad} of {self.seen} samples skipped ({self.fraction:.2%}, "
            f"{len(self.bad_keys)} distinct keys); {self._keys_text()}"
            + "".join(f"; note: {n}" for n in self.notes)
        )

    def as_dict(self) -> dict:
        """Machine-readable summary (for run logs / JSON reports)."""
        return {
            "seen": self.seen,
            "bad": self.bad,
            "fraction": self.fraction,
            "max_fraction": self.policy.max_fraction,
            "min_samples": self.policy.min_samples,
            "bad_keys": dict(self.bad_keys),
            "notes": list(self.notes),
            "lost": self.lost,
        }

    def load_dict(self, state: dict) -> None:
        """Restore counts saved with :meth:`as_dict` (the policy stays this tracker's own)."""
        self.seen = int(state["seen"])
        self.bad = int(state["bad"])
        self.bad_keys = dict(state["bad_keys"])
        self.notes = list(state.get("notes", []))
        self.lost = int(state.get("lost", 0))
