"""Async methods work like sync ones."""

import asyncio

from sr_testgame.base import GameBase


class AsyncGame(GameBase):
    def __init__(self) -> None:
        self.seen = 0

    async def echo(self, value):
        await asyncio.sleep(0)
        self.seen += 1
        return {"echoed": value}

    async def count(self) -> int:
        return self.seen

    async def hang(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def fail(self, message: str) -> None:
        raise RuntimeError(message)
