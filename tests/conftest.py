"""Shared fixtures: a private Mosquitto broker on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.broker import Broker


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run the long variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long variant: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker().start()
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def pbroker() -> Iterator[Broker]:
    """A broker that keeps the checker's persistent session across its own restarts."""
    b = Broker(persistence=True).start()
    try:
        yield b
    finally:
        b.cleanup()
