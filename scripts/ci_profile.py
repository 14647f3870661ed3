"""Helper of scripts/ci_profile.sh: runs the test suites under a process-tree monitor and writes a
markdown table (wall time, peak RSS of each pytest process and of its children, outcomes, load).

  suites OUT [--serial] [-- PYTEST_ARGS]  each test directory of both lanes as its own pytest
                                          process (two queues side by side, as scripts/test.sh's
                                          lanes; --serial: one process at a time)
  lanes OUT [-- TEST_SH_ARGS]             scripts/test.sh itself: one row per pytest process it
                                          starts, and the whole run

Peak RSS of a pytest process is the kernel's high-water mark (VmHWM, written at the end of the
session by tests/profiling/ci_profile_plugin.py, loaded with -p); children (the MegEngine worker,
torchrun and its ranks, CLI subprocesses) are sampled every 0.2 s with psutil: the largest sum
of the RSS of the live descendants, and the largest single one. Run with .venv's Python."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in .venv

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ["-p", "ci_profile_plugin"]  # tests/profiling/ci_profile_plugin.py, on PYTHONPATH
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *PLUGIN]
MAIN_LANE = [
    "tests/core",
    "tests/cli",
    "tests/torch",
    "tests/flax",
    "tests/backends",
    "tests/convert",
    "tests/bench",
    "tests/demo",
    "tests/reliability",
    "tests/quantize",
    "tests/families",
    "tests/graphfuse",
    "parity_tests",
]
SECOND_LANE = [(".venv-mge", "tests/core"), (".venv-mge", "tests/megengine"), (".venv", "tests/train")]


@dataclass
class Seen:
    """What the monitor saw of one pytest process."""

    cmdline: list[str]
    first: float
    last: float
    sampled_peak_mb: float = 0.0
    children_sum_peak_mb: float = 0.0
    child_peak_mb: float = 0.0
    child_peak_name: str = ""


@dataclass
class Monitor:
    """Samples the process tree under the given roots; each descendant is charged to its
    nearest pytest ancestor."""

    interval: float = 0.2
    roots: set[int] = field(default_factory=set)
    seen: dict[int, Seen] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                roots = list(self.roots)
            for root in roots:
                try:
                    self._sample(psutil.Process(root))
                except psutil.Error:
                    pass
            self.stop.wait(self.interval)

    def _sample(self, root: psutil.Process) -> None:
        now = time.monotonic()
        procs = [root, *root.children(recursive=True)]
        info: dict[int, tuple[int | None, list[str], float]] = {}
        for p in procs:
            try:
                info[p.pid] = (p.ppid(), p.cmdline(), p.memory_info().rss / 2**20)
            except psutil.Error:
                continue
        pytest_pids = {pid for pid, (_, cmd, _) in info.items() if "pytest" in cmd[1:3]}
        sums: dict[int, float] = {pid: 0.0 for pid in pytest_pids}
        for pid, (ppid, cmd, rss) in info.items():
            if pid in pytest_pids:
                s = self.seen.setdefault(pid, Seen(cmd, now, now))
                s.last = now
                s.sampled_peak_mb = max(s.sampled_peak_mb, rss)
                continue
            owner = ppid
            while owner is not None and owner in info and owner not in pytest_pids:
                owner = info[owner][0]
            if owner in pytest_pids and owner in self.seen:
                sums[owner] += rss
                s = self.seen[owner]
                if rss > s.child_peak_mb:
                    s.child_peak_mb = rss
                    s.child_peak_name = " ".join(cmd[:3])[-60:]
        for pid, total in sums.items():
            if pid in self.seen:
                self.seen[pid].children_sum_peak_mb = max(self.seen[pid].children_sum_peak_mb, total)


def _env(profile_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CI"] = "true"
    env["CI_PROFILE_DIR"] = str(profile_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests" / "profiling"), env.get("PYTHONPATH")) if p)
    return env


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _summary_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if " in " in line and ("passed" in line or "failed" in line or "error" in line or "no tests" in line):
            return line.strip("= ")
    return lines[-1] if lines else ""


def _records(profile_dir: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for f in profile_dir.glob("*.json"):
        data = json.loads(f.read_text())
        out[int(data["pid"])] = data
    return out


def _row(suite: str, env: str, wall: float, rec: dict[str, Any] | None, seen: Seen | None, load: str) -> dict[str, Any]:
    counts = rec["counts"] if rec else {}
    return {
        "suite": suite,
        "env": env,
        "wall_s": wall,
        "peak_rss_mb": rec["peak_rss_mb"] if rec else (seen.sampled_peak_mb if seen else float("nan")),
        "children_sum_peak_mb": seen.children_sum_peak_mb if seen else 0.0,
        "child_peak_mb": seen.child_peak_mb if seen else 0.0,
        "child_peak_name": seen.child_peak_name if seen else "",
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "errors": counts.get("errors", 0) + counts.get("collect_errors", 0),
        "skipped": counts.get("skipped", 0),
        "deselected": counts.get("deselected", 0),
        "exitstatus": rec["exitstatus"] if rec else None,
        "load": load,
        "files": rec["files"] if rec else {},
        "top_tests": rec.get("top_tests", []) if rec else [],
    }


def _watched(cmd: list[str], env: dict[str, str], log: Path, mon: Monitor) -> tuple[int, int, float]:
    """Run cmd (output to log) with its process tree under the monitor: pid, exit status, wall s."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with mon.lock:
            mon.roots.add(proc.pid)
        proc.wait()
    with mon.lock:
        mon.roots.discard(proc.pid)
    return proc.pid, proc.returncode, time.monotonic() - t0


def _run_suite(python: str, paths: list[str], extra: list[str], work: Path, mon: Monitor, name: str) -> dict[str, Any]:
    prof = work / name
    log = work / f"{name}.log"
    load0 = _load()
    cmd = [str(ROOT / python / "bin" / "python"), *PYTEST, *paths, *extra]
    pid, returncode, wall = _watched(cmd, _env(prof), log, mon)
    recs = _records(prof)
    row = _row(" ".join(paths), python, wall, recs.get(pid), mon.seen.get(pid), f"{load0} → {_load()}")
    row["summary"] = _summary_line(log)
    row["returncode"] = returncode
    print(
        f"  {row['suite']:<22} {python:<9} {wall:7.1f} s  {row['peak_rss_mb']:7.0f} MB  "
        f"children {row['children_sum_peak_mb']:6.0f} MB  {row['summary']}",
        flush=True,
    )
    return row


def suites(out: Path, extra: list[str], serial: bool) -> tuple[list[dict[str, Any]], float, int]:
    work = Path(tempfile.mkdtemp(prefix="ci_profile_", dir=out.parent))
    mon = Monitor()
    threading.Thread(target=mon.run, daemon=True).start()
    main_q = [(".venv", [d], d.replace("/", "_")) for d in MAIN_LANE]
    second_q = [(env, [d], f"{env.strip('.')}_{d.replace('/', '_')}") for env, d in SECOND_LANE]
    rows: dict[str, dict[str, Any]] = {}

    def drain(queue: list[tuple[str, list[str], str]]) -> None:
        for python, paths, name in queue:
            rows[name] = _run_suite(python, paths, extra, work, mon, name)

    t0 = time.monotonic()
    if serial:
        drain(main_q + second_q)
    else:
        second = threading.Thread(target=drain, args=(second_q,))
        second.start()
        drain(main_q)
        second.join()
    wall = time.monotonic() - t0
    mon.stop.set()
    ordered = [rows[name] for _, _, name in main_q + second_q]
    status = 0 if all(r["returncode"] == 0 for r in ordered) else 1
    print(f"logs: {work}")
    return ordered, wall, status


def lanes(out: Path, extra: list[str]) -> tuple[list[dict[str, Any]], float, int]:
    work = Path(tempfile.mkdtemp(prefix="ci_profile_", dir=out.parent))
    prof = work / "records"
    log = work / "test.sh.log"
    mon = Monitor()
    threading.Thread(target=mon.run, daemon=True).start()
    env = _env(prof)
    env["REPARAM_SKIP_SETUP"] = "1"  # the environments as they are (they may be another checkout's)
    _, returncode, wall = _watched(["bash", "scripts/test.sh", *PLUGIN, *extra], env, log, mon)
    mon.stop.set()
    recs = _records(prof)
    rows = []
    for pid, seen in sorted(mon.seen.items(), key=lambda kv: kv[1].first):
        rec = recs.get(pid)
        cmd = seen.cmdline
        paths = [a for a in (rec["args"] if rec else cmd) if not a.startswith("-") and "/" in a and "bin/" not in a]
        python = Path(cmd[0]).parent.parent.name if cmd else "?"
        if rec:
            start, end = ("/".join(f"{x:.1f}" for x in rec[k]) for k in ("load_start", "load_end"))
            load = f"{start} → {end}"
        else:
            load = ""
        rows.append(_row(" ".join(paths), python, seen.last - seen.first, rec, seen, load))
    for row in rows:
        print(f"  {row['suite'][:60]:<60} {row['env']:<9} {row['wall_s']:7.1f} s  {row['peak_rss_mb']:7.0f} MB")
    print(f"log: {log}")
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("==") or " in " in line]
    print("\n".join(tail[-40:]))
    return rows, wall, returncode


def markdown(mode: str, rows: list[dict[str, Any]], wall: float, status: int, extra: list[str]) -> str:
    head = (
        f"## ci_profile ({mode}) {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; pytest args: {' '.join(extra) or '(none)'}\n\n"
        "Wall times depend on the machine's load (load average 1/5/15 min at the start → end of "
        "each row); peak RSS does not. Peak RSS: the pytest process's high-water mark (VmHWM); "
        "children: the largest sum over its live descendants (sampled every 0.2 s), and the "
        "largest single one.\n\n"
        "| suite | env | wall s | peak RSS MB | children MB (sum / largest) | passed | failed | errors "
        "| skipped | deselected | load start → end |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|\n"
    )
    lines = []
    for r in rows:
        child = f"{r['children_sum_peak_mb']:.0f} / {r['child_peak_mb']:.0f}" if r["children_sum_peak_mb"] else "-"
        lines.append(
            f"| {r['suite']} | {r['env']} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | {child} | {r['passed']} "
            f"| {r['failed']} | {r['errors']} | {r['skipped']} | {r['deselected']} | {r['load']} |"
        )
    total = sum(r["passed"] for r in rows)
    foot = (
        f"\nWhole run: {wall:.0f} s wall, exit status {status}, {total} passed in all, "
        f"largest pytest process {max((r['peak_rss_mb'] for r in rows), default=0):.0f} MB.\n"
    )
    files = []
    for r in rows:
        for path, f in r["files"].items():
            if "rss_after_mb" in f:
                peak = f.get("file_peak_mb", f["hwm_after_mb"])
                files.append((peak, f["rss_after_mb"] - f["rss_before_mb"], path, f, r["env"]))
    if files:
        foot += (
            "\nTest files by their own peak RSS (the process's high-water mark while the file ran, reset "
            "when it started; without the reset: the high-water mark so far) and by growth (RSS after its last "
            "test − before its first: what it leaves behind):\n\n| file | env | own peak MB | growth MB "
            "| RSS after MB | wall s |\n|---|---|--:|--:|--:|--:|\n"
        )
        top = sorted(files, key=lambda g: g[0], reverse=True)[:12]
        top += [g for g in sorted(files, key=lambda g: g[1], reverse=True)[:8] if g not in top]
        for peak, growth, path, f, env in top:
            foot += (
                f"| {path} | {env} | {peak:.0f} | {growth:.0f} | {f['rss_after_mb']:.0f} "
                f"| {f['t_end'] - f['t_start']:.0f} |\n"
            )
    tests = sorted(((peak, node, r["env"]) for r in rows for peak, node in r.get("top_tests", [])), reverse=True)
    if tests:
        foot += "\nTests by their own peak RSS (VmHWM reset when each test starts):\n\n"
        foot += "| test | env | peak MB |\n|---|---|--:|\n"
        foot += "".join(f"| {node} | {env} | {peak:.0f} |\n" for peak, node, env in tests[:12])
    return head + "\n".join(lines) + "\n" + foot


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["suites", "lanes"])
    parser.add_argument("out", type=Path, help="markdown file to write (its .json beside it)")
    parser.add_argument("--serial", action="store_true", help="suites: one pytest process at a time")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.mode == "suites":
        rows, wall, status = suites(out, extra, args.serial)
    else:
        rows, wall, status = lanes(out, extra)
    text = markdown(args.mode, rows, wall, status, extra)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"wall_s": wall, "status": status, "rows": rows}, indent=1))
    print()
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
