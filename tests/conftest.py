"""Shared fixtures: a small real dataset (scikit-learn's digits) and the path to ../shared/data; the skip policy.

Skip policy: a skipped test is a test that did not run, so a run fails when a test skipped that should
have run. Allowed: tests marked `gpu` (no CUDA device), and tests that need ../shared/data while that
folder is absent (a user's machine). Anything else (a missing package, browser or tool) fails the run
with the skip reasons listed; `DUOCLASS_ALLOW_SKIPS=1` turns the policy off for a run on purpose.
"""
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
    from duoclass.cli.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    import subprocess

    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "duoclass", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


# --- skip policy ---------------------------------------------------------------------------------
ALLOWED_SKIP_MARKERS = ("gpu",)
_bad_skips: list[str] = []


def _skip_allowed(report) -> bool:
    if any(m in getattr(report, "keywords", {}) for m in ALLOWED_SKIP_MARKERS):
        return True
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return "shared dataset" in reason and not SHARED.exists()


def _note_skip(report) -> None:
    if report.skipped and not _skip_allowed(report):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        _bad_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)  # a module-level importorskip skips the whole file at collection


def pytest_sessionfinish(session, exitstatus) -> None:
    if _bad_skips and not os.environ.get("DUOCLASS_ALLOW_SKIPS") and exitstatus in (0, 5):  # 5: nothing ran at all
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus) -> None:
    if _bad_skips and not os.environ.get("DUOCLASS_ALLOW_SKIPS"):
        terminalreporter.section("skips that fail this run (install what they name, or set DUOCLASS_ALLOW_SKIPS=1)")
        for line in _bad_skips:
            terminalreporter.line(line)
