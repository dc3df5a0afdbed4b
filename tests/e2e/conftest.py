"""Servers shared by the e2e modules: one per configuration for the whole session.

`servers.get(key, start)` starts a server with `start(folder)` the first time `key` is asked for and
hands the same one to every later test (a test that stops it, on purpose, makes the next `get`
start a fresh one). `servers.start_soon(key, start)` starts one loading in the background, so that
a test that needs a server idle for a while finds it so already instead of sleeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.test_serve import Server, _stop

Start = Callable[[Path], Server]


class ServerPool:
    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp = tmp_path_factory
        self.servers: dict[str, Server] = {}
        self.ready: dict[str, float] = {}
        self.pending: dict[str, tuple[threading.Thread, dict]] = {}

    def start_soon(self, key: str, start: Start) -> None:
        """Start `key` in a background thread (its process loads meanwhile); `get` joins it."""
        if key in self.pending or (key in self.servers and self.servers[key].proc.poll() is None):
            return
        folder, box = self.tmp.mktemp(key), {}

        def run() -> None:
            try:
                box["server"] = start(folder)
                box["ready"] = time.monotonic()
            except BaseException as exc:  # handed to the test that asks for it
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"start {key}", daemon=True)
        thread.start()
        self.pending[key] = (thread, box)

    def get(self, key: str, start: Start) -> Server:
        server = self.servers.get(key)
        if server is not None and server.proc.poll() is None:
            return server
        if server is not None:  # stopped by a test: a fresh one for the next
            self._close(self.servers.pop(key))
        self.start_soon(key, start)
        thread, box = self.pending.pop(key)
        thread.join()
        if "error" in box:
            raise box["error"]
        self.servers[key], self.ready[key] = box["server"], box["ready"]
        return box["server"]

    def idle_since(self, key: str) -> float:
        """When `key` became healthy (time.monotonic())."""
        return self.ready[key]

    @staticmethod
    def _close(server: Server) -> None:
        server.client.close()
        _stop(server.proc)

    def close(self) -> None:
        for thread, _ in self.pending.values():
            thread.join()
        for _, box in self.pending.values():
            if "server" in box:
                self._close(box["server"])
        for server in self.servers.values():
            self._close(server)


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory)
    yield pool
    pool.close()
