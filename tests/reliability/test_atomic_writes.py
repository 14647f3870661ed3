"""Atomic, non-destructive writes: `reparam convert` killed with SIGKILL at several moments
(RepVGG-B1, ~230 MB, so the write takes a while) leaves DST either absent or complete and valid
(byte-identical to an uninterrupted conversion), never partial; an existing DST is untouched
without --overwrite, and with --overwrite it is the old or the new file, never a mix.

Temp files: convert writes `.DST.<pid>-<random>.tmp` next to DST. A killed process leaves it
behind; the next convert to the same DST removes temp files whose pid is no longer running
(a live process's temp file is left alone)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from _big import write_train_safetensors

from reparam_core.formats.atomic import clean_stale_temps, temp_name_pattern
from reparam_core.formats.convert import convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = "RepVGG-B1"


def digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def b1(tmp_path_factory):
    d = tmp_path_factory.mktemp("b1")
    src = d / "b1.safetensors"
    write_train_safetensors(MODEL, src)
    ref = d / "ref.safetensors"
    convert(src, ref, MODEL, to_deploy=True)
    return src, digest(ref)


def start(src, dst, *extra):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.convert", str(src), str(dst), "--model", MODEL, "--to-deploy", "-q", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def temps(directory, dst):
    pat = temp_name_pattern(str(dst))
    return [n for n in os.listdir(directory) if pat.match(n)]


def kill_when(proc, directory, dst, moment):
    """SIGKILL `proc` after a delay (float) or once its temp file exists / has data."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 60:
        if isinstance(moment, float) and time.time() - t0 >= moment:
            break
        if moment in ("temp", "data"):
            names = temps(directory, dst)
            if names and (moment == "temp" or os.path.getsize(os.path.join(directory, names[0])) > 50 << 20):
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def test_sigkill_leaves_nothing_or_a_complete_file(tmp_path, b1):
    src, ref = b1
    rng = random.Random(0)
    moments = ["temp", "data", 0.3, 1.0] + [round(rng.uniform(0.5, 4.0), 2) for _ in range(3)]
    outcomes = []
    for i, moment in enumerate(moments):
        dst = tmp_path / f"out{i}.safetensors"
        proc = start(src, dst)
        rc = kill_when(proc, tmp_path, dst, moment)
        if dst.exists():
            assert digest(dst) == ref, f"partial or wrong DST after kill at {moment}"
            outcomes.append("complete")
        else:
            outcomes.append("absent")
        assert rc in (-signal.SIGKILL, 0)
    # the write really was interrupted at least once (a temp file left by a killed process)
    assert "absent" in outcomes
    assert any(temps(tmp_path, tmp_path / f"out{i}.safetensors") for i in range(len(moments)))
    # a later run to the same DST cleans the dead process's temp file and completes
    for i in range(len(moments)):
        dst = tmp_path / f"out{i}.safetensors"
        if not dst.exists():
            convert(src, dst, MODEL, to_deploy=True)
            assert digest(dst) == ref
        assert not temps(tmp_path, dst)
    print(f"\nkill outcomes: {list(zip(moments, outcomes))}")


def test_existing_destination_untouched_or_replaced_whole(tmp_path, b1):
    src, ref = b1
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    proc = start(src, dst)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and b"already exists" in err
    assert dst.read_bytes() == b"precious"
    for moment in ("temp", "data", 1.5):
        proc = start(src, dst, "--overwrite")
        kill_when(proc, tmp_path, dst, moment)
        data_ok = dst.read_bytes() == b"precious" or digest(dst) == ref
        assert data_ok, f"DST is neither the old nor the new file after a kill at {moment}"
    convert(src, dst, MODEL, to_deploy=True, overwrite=True)
    assert digest(dst) == ref and not temps(tmp_path, dst)


def test_live_process_temp_files_are_kept(tmp_path):
    dst = tmp_path / "x.safetensors"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".x.safetensors.{sleeper.pid}-abc123.tmp"
        live.write_bytes(b"in progress")
        dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
        dead_pid.wait()
        dead = tmp_path / f".x.safetensors.{dead_pid.pid}-zzz999.tmp"
        dead.write_bytes(b"stale")
        other = tmp_path / f".y.safetensors.{dead_pid.pid}-zzz999.tmp"
        other.write_bytes(b"another file's temp")
        removed = clean_stale_temps(str(dst))
        assert removed == [str(dead)]
        assert live.exists() and other.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
