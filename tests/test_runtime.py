"""The agent's start order (agent/runtime.py): sources load in the background while the pipeline
starts, and join the start they were loaded for only; one that finishes loading after a reload
or a stop is closed, never run beside the new start's."""
from __future__ import annotations

import threading
import time

from agent import config, runtime
from agent.component import Factory
from agent.components import Config
from agent.sources import Source
from agent.sources.ebpf.config import EbpfConfig


class SlowSource(Source):
    """A source whose loading takes until the test lets it finish."""
    name = "ebpf"
    made: list = []

    def __init__(self):
        self.loaded, self.started, self.closed = threading.Event(), False, False

    @classmethod
    def create(cls, cfg, telemetry, **kwargs) -> "SlowSource":
        source = cls()
        cls.made.append(source)
        assert source.loaded.wait(30)
        return source

    def start(self, emit) -> None:
        self.started = True

    def collect(self) -> list:
        return []

    def close(self) -> None:
        self.closed = True


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_source_loaded_for_an_earlier_start_never_joins_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "SOURCES", {"ebpf": Factory("ebpf", EbpfConfig, SlowSource.create)})
    SlowSource.made = []
    cfg = config.build(Config, {"state_dir": str(tmp_path / "state"), "health": {"endpoint": "127.0.0.1:0"},
                                "exporter": {"type": "file", "file": {"path": str(tmp_path / "m.jsonl"),
                                                                      "logs_path": str(tmp_path / "l.jsonl")}}})
    agent = runtime.Agent(cfg)
    agent.start()
    try:
        wait_for(lambda: len(SlowSource.made) == 1)
        first = SlowSource.made[0]
        assert agent.reload(cfg)                    # while the first start's source still loads
        wait_for(lambda: len(SlowSource.made) == 2)
        second = SlowSource.made[1]
        first.loaded.set()
        wait_for(lambda: first.closed)
        assert not first.started and first not in agent.sources
        second.loaded.set()
        wait_for(lambda: second in agent.sources)
        assert second.started and not second.closed
        assert [s for s in agent.sources if isinstance(s, SlowSource)] == [second]
    finally:
        for s in SlowSource.made:
            s.loaded.set()
        agent.stop()
    assert second.closed
