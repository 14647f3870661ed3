"""pytest plugin used by scripts/ci_profile.sh (`-p ci_profile_plugin`, this folder on PYTHONPATH): when
CI_PROFILE_DIR is set, writes <CI_PROFILE_DIR>/<pid>.json at the end of the session with the
process's peak RSS (VmHWM, exact: the kernel's high-water mark, not a sample), the outcome
counts, the wall time, the load average at the start and the end, and per test file its RSS
before its first test, after its last test, its own peak and its wall time (to find what a file
keeps), and the tests with the largest own peak (VmHWM is reset at each test, after folding it
into the file's and the session's peaks).
Standard library only: it runs in .venv and .venv-mge. Without CI_PROFILE_DIR it does nothing.
It lives under tests/ because Hypothesis draws constants from every loaded local module outside
test directories: loaded from elsewhere, it would change the property tests' examples."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytest

_PAGE = os.sysconf("SC_PAGE_SIZE")
TOP_TESTS = 10


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Recorder:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.t0 = time.monotonic()
        self.load_start = os.getloadavg()
        self.counts: dict[str, int] = {}
        self.files: dict[str, dict[str, float]] = {}
        self.current: str | None = None
        self.peak = 0.0  # the session's peak: VmHWM is reset at each test, folded in here first
        self.reset = False
        self.tests: list[tuple[float, str]] = []

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self._count("deselected", len(items))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._count("collect_errors")

    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        path = nodeid.split("::")[0]
        hwm = _hwm_mb()
        self.peak = max(self.peak, hwm)
        if self.current in self.files and "file_peak_mb" in self.files[self.current]:
            entry = self.files[self.current]
            entry["file_peak_mb"] = max(entry["file_peak_mb"], hwm)
        self.reset = _reset_hwm()  # each test's own peak; the file's and the session's are folded in
        if path not in self.files:
            self.files[path] = {"rss_before_mb": _rss_mb(), "t_start": time.monotonic() - self.t0}
            if self.reset:
                self.files[path]["file_peak_mb"] = 0.0
        self.current = path

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if hasattr(report, "wasxfail"):
                self._count("xfailed" if report.skipped else "xpassed")
            elif report.when == "setup" and report.failed:
                self._count("errors")
            else:
                self._count(report.outcome)
        elif report.when == "teardown" and report.failed:
            self._count("errors")

    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        entry = self.files[nodeid.split("::")[0]]
        entry["rss_after_mb"] = _rss_mb()
        entry["hwm_after_mb"] = _hwm_mb()
        if "file_peak_mb" in entry:  # this file's own high-water mark (reset at its first test)
            entry["file_peak_mb"] = max(entry["file_peak_mb"], entry["hwm_after_mb"])
        if self.reset:  # the largest tests by their own peak
            self.tests.append((entry["hwm_after_mb"], nodeid))
            self.tests = sorted(self.tests, reverse=True)[:TOP_TESTS]
        entry["t_end"] = time.monotonic() - self.t0

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        data: dict[str, Any] = {
            "pid": os.getpid(),
            "python": sys.executable,
            "args": [str(a) for a in session.config.invocation_params.args],
            "exitstatus": int(exitstatus),
            "wall_s": time.monotonic() - self.t0,
            "peak_rss_mb": max(self.peak, _hwm_mb()),
            "end_rss_mb": _rss_mb(),
            "reaped_children_max_rss_mb": children,
            "load_start": self.load_start,
            "load_end": os.getloadavg(),
            "counts": self.counts,
            "files": self.files,
            "top_tests": self.tests,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{os.getpid()}.json").write_text(json.dumps(data, indent=1))


def pytest_configure(config: pytest.Config) -> None:
    out = os.environ.get("CI_PROFILE_DIR")
    if out:
        config.pluginmanager.register(_Recorder(Path(out)), "ci_profile_recorder")
