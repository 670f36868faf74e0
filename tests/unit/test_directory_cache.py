from __future__ import annotations

from zimage_pipeline.directory.cache import TtlCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_live_until_their_own_deadline() -> None:
    clock = FakeClock()
    cache: TtlCache[str | None] = TtlCache(max_entries=10, clock=clock)
    cache.put("alice", "identity", ttl_s=60)
    cache.put("ghost", None, ttl_s=15)  # negative entry: shorter TTL
    clock.now += 14.9
    assert cache.get("alice") == (True, "identity")
    assert cache.get("ghost") == (True, None)
    clock.now += 0.2
    assert cache.get("ghost") == (False, None)
    assert cache.get("alice") == (True, "identity")
    clock.now += 60
    assert cache.get("alice") == (False, None)
    assert len(cache) == 0


def test_bound_evicts_least_recently_used() -> None:
    cache: TtlCache[int] = TtlCache(max_entries=2, clock=FakeClock())
    cache.put("a", 1, ttl_s=60)
    cache.put("b", 2, ttl_s=60)
    assert cache.get("a") == (True, 1)  # a is now the most recent
    cache.put("c", 3, ttl_s=60)
    assert cache.get("b") == (False, None)
    assert cache.get("a") == (True, 1)
    assert cache.get("c") == (True, 3)


def test_zero_ttl_disables_caching_and_invalidate_drops() -> None:
    cache: TtlCache[int] = TtlCache(max_entries=5, clock=FakeClock())
    cache.put("a", 1, ttl_s=0)
    assert cache.get("a") == (False, None)
    cache.put("a", 1, ttl_s=10)
    cache.invalidate("a")
    assert cache.get("a") == (False, None)
