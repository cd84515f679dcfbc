"""The two-worker schedule (tests/conftest.py): its keys name real modules, and a module's tests,
or a group's, go to one worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests import conftest

TESTS = Path(__file__).resolve().parent


def test_every_scheduling_key_names_a_test_module():
    keys = set(conftest._GROUPS) | set(conftest._GROUPS.values()) | set(conftest._LONGEST_FIRST)
    missing = sorted(k for k in keys if not (TESTS / f"{k}.py").is_file())
    assert missing == [], f"tests/conftest.py schedules modules that do not exist: {missing}"


def test_a_module_and_its_group_share_one_scope():
    g = conftest._group
    assert g("tests/detector/test_em.py::test_x") == g("tests/detector/test_em.py::test_y[1]") == "detector/test_em"
    assert g("tests/integration/test_review_page.py::t") == g("tests/detector/test_detectors.py::t")
    assert g("tests/integration/test_gate.py::t") != g("tests/components/test_promotion.py::t")


def test_two_workers_keep_each_module_on_one_worker(tmp_path):
    """`make test`'s `-n 2` through the conftest's scheduler: every test of a module on one worker."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_xdist_make_scheduler  # noqa: F401\n")
    for module in ("test_a", "test_b"):
        cases = "\n".join(f"def test_{i}():\n    pass\n" for i in range(6))
        (tmp_path / f"{module}.py").write_text(cases)
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", "-p", "no:randomly"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ran = re.findall(r"\[(gw\d+)\] \[ *\d+%\] PASSED (test_[ab])\.py::", p.stdout)
    assert len(ran) == 12, p.stdout[-3000:]
    workers = {module: {w for w, m in ran if m == module} for module in ("test_a", "test_b")}
    assert all(len(w) == 1 for w in workers.values()), workers
