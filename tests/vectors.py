"""Access to the protocol vectors (real frames with expected values), vendored in tests/data/vectors/ with their sources."""

import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_DIR = REPO_ROOT / "tests" / "data" / "vectors"


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS_DIR / name).read_text())
