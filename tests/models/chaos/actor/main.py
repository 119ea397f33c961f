"""The chaos test's model: every call says what to do (the coordinator's per-model arguments).

`echo({"round": n, "act": ...})` answers the value (act "ok"), raises ("raise"), returns
something no codec can encode ("garbage"), kills its own worker mid-call ("crash") or
sleeps far past any timeout ("sleep"). One submission serves every chaos model id, so
which model misbehaves, and when, is decided by the test's seeded plan alone.
"""

import os
import time

from sr_testgame.base import GameBase


class Actor(GameBase):
    def __init__(self) -> None:
        self.seen = 0

    def echo(self, value):
        self.seen += 1
        act = value.get("act", "ok") if isinstance(value, dict) else "ok"
        if act == "raise":
            raise ValueError(f"bad luck in round {value['round']}")
        if act == "garbage":
            return {"set", "is", "not", "encodable"}
        if act == "crash":
            os._exit(17)
        if act == "sleep":
            time.sleep(60)
        return value

    def count(self) -> int:
        return self.seen

    def hang(self, seconds: float) -> None:
        time.sleep(seconds)

    def fail(self, message: str) -> None:
        raise RuntimeError(message)
