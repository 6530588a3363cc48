"""The skip policy of tests/conftest.py: a test that skips for a missing tool fails the run; a GPU test may skip.

Each case runs pytest in a subprocess on a made-up test file beside a copy of this suite's conftest.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CASES = {
    "missing-tool": ("import pytest\n\ndef test_page():\n    pytest.skip('no Chromium binary')\n", 1),
    "module-importorskip": ("import pytest\npytest.importorskip('no_such_module_anywhere')\n\ndef test_x():\n    pass\n", 1),
    "gpu-marked": ("import pytest\n\n@pytest.mark.gpu\ndef test_cuda():\n    pytest.skip('no CUDA device')\n", 0),
    "shared-data-absent": ("from .conftest import shared\n\ndef test_real():\n    shared('no-such-set')\n", 0),
    "nothing-skipped": ("def test_ok():\n    assert True\n", 0),
}


@pytest.mark.parametrize("case", CASES)
def test_skip_policy(case: str, tmp_path: Path) -> None:
    code, expected = CASES[case]
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "__init__.py").write_text("")
    shutil.copy(HERE / "conftest.py", suite / "conftest.py")
    (suite / "test_case.py").write_text(code)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    env = {k: v for k, v in os.environ.items() if k != "DUOCLASS_ALLOW_SKIPS"}
    env["DUOCLASS_SHARED_DATA"] = str(tmp_path / "absent")  # a user's machine: no ../shared/data
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(suite)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == expected, r.stdout + r.stderr
    if expected:
        assert "skips that fail this run" in r.stdout
        env["DUOCLASS_ALLOW_SKIPS"] = "1"  # the documented way out, for a run made without the tool on purpose
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 5), r.stdout  # 5: pytest's "no test ran" (the file skipped at collection)


def test_shared_data_skip_fails_where_the_data_exists(tmp_path: Path) -> None:
    """On CI ../shared/data is there: a test that still skips for its data (a wrong path) fails the run."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "__init__.py").write_text("")
    shutil.copy(HERE / "conftest.py", suite / "conftest.py")
    (suite / "test_case.py").write_text("from .conftest import shared\n\ndef test_real():\n    shared('no-such-set')\n")
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DUOCLASS_ALLOW_SKIPS"}
    env["DUOCLASS_SHARED_DATA"] = str(tmp_path / "data")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
