"""The replay cache: each token nonce is accepted once per target.

Bounded and fail-closed: entries live only until their token could no longer
pass the time check (exp + skew); when the cache is full of live entries a new
token is refused (REPLAY_CACHE_FULL) rather than an old entry forgotten, since
forgetting would let that token be replayed. A restart empties the cache, so
the runner also refuses tokens issued before it started (SMP-10).
Pure: the caller passes the clock.
"""

from __future__ import annotations

import heapq

from secure_runner.errors import AuthError, ErrorCode


class ReplayCache:
    def __init__(self, capacity: int = 200_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._expiry: dict[tuple[str, str], int] = {}
        self._heap: list[tuple[int, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def _evict(self, horizon: int) -> None:
        """Drop entries whose token expired at or before `horizon` (= now - skew)."""
        while self._heap and self._heap[0][0] <= horizon:
            _, key = heapq.heappop(self._heap)
            del self._expiry[key]

    def insert(self, nonce: str, target: str, expires_at: int, horizon: int) -> None:
        """SMP-14: record (nonce, target) or refuse it as replayed, or refuse when full."""
        self._evict(horizon)
        key = (nonce, target)
        if key in self._expiry:
            raise AuthError(ErrorCode.TOKEN_REPLAYED, "token nonce already used for this target")
        if len(self._expiry) >= self.capacity:
            raise AuthError(ErrorCode.REPLAY_CACHE_FULL, "replay cache is full; refusing new tokens")
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
