"""Fixtures of the unit tests: a real buffer (SQLite in the test's folder) behind its store thread."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.pipeline.store import AsyncStore, Store


@pytest.fixture
async def async_store(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    """An open `AsyncStore` on `tmp_path/buffer.db` (64 MiB), closed after the test."""
    s = AsyncStore(Store(tmp_path / "buffer.db", 64 * 1024 * 1024))
    await s.open()
    yield s
    await s.close()
