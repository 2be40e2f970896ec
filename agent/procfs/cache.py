"""A two-level cache bounded by entry count: a small L1 of hot entries in front of a larger L2.

New entries go to L2. An L2 entry hit `promote_hits` times moves to L1; when L1 is full its
least recently used entry is demoted to the front of L2 (it gets a second chance there), and
when L2 is full its least recently used entry is evicted. So a burst of one-off keys (the pids
of a build's thousand short-lived compilers) passes through L2 without pushing the hot keys (the
host's long-running services) out of L1, where a plain LRU of the same size would lose them.
This is a segmented LRU (Karedla et al., 1994).

`invalidate(key)` removes a key from both levels at once: the process probe calls it when a
process exits, so a recycled pid never finds the dead process's entry.

One thread owns a cache (no locks). Counts are plain integers; `publish()` adds what changed
since the last call to the agent's own metrics (hostagent.cache.*, in the `telemetry` it is
given), once per batch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

_MISSING = object()


class TwoLevelCache:
    def __init__(self, name: str, l1_size: int, l2_size: int, telemetry, promote_hits: int = 2):
        if l1_size < 1 or l2_size < 1 or promote_hits < 1:
            raise ValueError("cache sizes and promote_hits must be at least 1")
        self._lookups = telemetry.counter("hostagent.cache.lookups", "{lookup}",
                                          "Cache lookups by result: l1_hit, l2_hit or miss.")
        self._moves = (  # in the order publish() counts them
            telemetry.counter("hostagent.cache.promotions", "{entry}", "Entries moved from L2 to L1 on repeated hits."),
            telemetry.counter("hostagent.cache.demotions", "{entry}", "Entries moved from a full L1 back to L2."),
            telemetry.counter("hostagent.cache.evictions", "{entry}", "Entries dropped from a full L2."),
            telemetry.counter("hostagent.cache.invalidations", "{entry}",
                              "Entries removed because what they describe ended (a process exited)."))
        entries = telemetry.gauge("hostagent.cache.entries", "{entry}", "Entries held, by cache and level.")
        self.name, self.l1_size, self.l2_size, self.promote_hits = name, l1_size, l2_size, promote_hits
        self._l1: OrderedDict = OrderedDict()   # key -> value, least recently used first
        self._l2: OrderedDict = OrderedDict()   # key -> [value, hits in L2]
        self.l1_hits = self.l2_hits = self.misses = 0
        self.promotions = self.demotions = self.evictions = self.invalidations = 0
        self._published = (0,) * 7
        entries.observe((("cache", name), ("level", "l1")), lambda: len(self._l1))
        entries.observe((("cache", name), ("level", "l2")), lambda: len(self._l2))

    def __len__(self) -> int:
        return len(self._l1) + len(self._l2)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._l1 or key in self._l2

    def get(self, key: Hashable, default: Any = None) -> Any:
        value = self._l1.get(key, _MISSING)
        if value is not _MISSING:
            self._l1.move_to_end(key)
            self.l1_hits += 1
            return value
        entry = self._l2.get(key)
        if entry is None:
            self.misses += 1
            return default
        self.l2_hits += 1
        entry[1] += 1
        if entry[1] >= self.promote_hits:
            del self._l2[key]
            self._promote(key, entry[0])
        else:
            self._l2.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or replace. A replaced L1 entry stays in L1; anything else starts in L2."""
        if key in self._l1:
            self._l1[key] = value
            self._l1.move_to_end(key)
            return
        self._l2.pop(key, None)
        self._to_l2(key, value)

    def invalidate(self, key: Hashable) -> bool:
        """Forget `key` in both levels; True if it was cached."""
        if self._l1.pop(key, _MISSING) is _MISSING and self._l2.pop(key, None) is None:
            return False
        self.invalidations += 1
        return True

    def keys(self, level: int) -> list:
        """The keys of L1 (level 1) or L2 (level 2), least recently used first."""
        return list(self._l1 if level == 1 else self._l2)

    def _promote(self, key: Hashable, value: Any) -> None:
        self.promotions += 1
        self._l1[key] = value
        if len(self._l1) > self.l1_size:
            old_key, old_value = self._l1.popitem(last=False)
            self.demotions += 1
            self._to_l2(old_key, old_value)

    def _to_l2(self, key: Hashable, value: Any) -> None:
        self._l2[key] = [value, 0]
        if len(self._l2) > self.l2_size:
            self._l2.popitem(last=False)
            self.evictions += 1

    def publish(self) -> None:
        """Add the counts since the last call to hostagent.cache.* (once per batch, not per lookup)."""
        now = (self.l1_hits, self.l2_hits, self.misses, self.promotions, self.demotions,
               self.evictions, self.invalidations)
        if now == self._published:
            return
        delta = [a - b for a, b in zip(now, self._published)]
        self._published = now
        cache = ("cache", self.name)
        for result, n in zip(("l1_hit", "l2_hit", "miss"), delta[:3]):
            if n:
                self._lookups.add(n, (cache, ("result", result)))
        for counter, n in zip(self._moves, delta[3:]):
            if n:
                counter.add(n, (cache,))

