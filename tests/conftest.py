"""Shared fixtures: a small real dataset (scikit-learn's digits) and the path to ../shared/data."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DUOCLASS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(rel: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared dataset {p} is absent (real data lives in ../shared/data next to the repository)")
    return p


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's handwritten digits as an ImageFolder tree with train/ and test/ (8x8 PNGs)."""
    from duoclass.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    import subprocess

    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "duoclass", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
