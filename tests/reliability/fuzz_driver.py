"""Fuzz driver for the checkpoint readers, run as a subprocess by test_fuzz.py.

    python tests/reliability/fuzz_driver.py --per-format N --convert M --out result.json
        [--derandomize] [--mem-mib 1536] [--case-timeout 20]

Mutates valid RepVGG-mini (num_classes=10) checkpoints of every format (safetensors, torch zip,
MegEngine pickle, Flax msgpack) with hypothesis -- bit flips, truncation, inserted/deleted/
overwritten bytes, deleted/renamed/duplicated keys, shape and dtype changes, NaN/Inf, and
headers or records that claim terabytes -- and feeds every file to every reader (and a sample to
reparam_core.formats.convert.convert). An outcome is fine when it is a result or a ReparamError subclass with
a message; anything else (another exception type, an empty message, a per-case timeout, a
MemoryError under the RLIMIT_AS cap set at start-up) is recorded as a failure in the JSON
written to --out, together with the case counts.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from reparam_core import get_spec, random_state, state_schema  # noqa: E402
from reparam_core.blocks.fuse import reparameterize_state  # noqa: E402
from reparam_core.errors import ReparamError  # noqa: E402
from reparam_core.formats import detect_format, read_raw, safetensors_io, to_neutral  # noqa: E402
from reparam_core.formats.convert import convert  # noqa: E402
from reparam_core.formats.flax_msgpack import read_flax_msgpack  # noqa: E402
from reparam_core.formats.torch_zip import torch_pickle, torch_zip_bytes  # noqa: E402
from reparam_core.weights.layouts import flax_key, to_flax, to_megengine  # noqa: E402

MODEL = "RepVGG-mini"
SPEC = get_spec(MODEL, 10)
STATES = {f: random_state(SPEC, f, seed=i) for i, f in enumerate(("train", "deploy"))}
SCHEMAS = {f: state_schema(SPEC, f) for f in ("train", "deploy")}
FORMATS = ("safetensors", "torch", "megengine", "flax")
EXT = {"safetensors": ".safetensors", "torch": ".pth", "megengine": ".pkl", "flax": ".msgpack"}
TB = 1 << 40


class CaseTimeout(BaseException):
    """Raised by the per-case alarm (a BaseException: readers cannot swallow it)."""


def _alarm(signum, frame):
    raise CaseTimeout()


# --------------------------------------------------------------------------- encoders


def _flax_pack(tree) -> bytes:
    def default(obj):
        if isinstance(obj, np.ndarray):
            payload = msgpack.packb((list(obj.shape), obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(1, payload)
        raise TypeError(type(obj).__name__)

    return msgpack.packb(tree, default=default, use_bin_type=True)


def encode(fmt: str, state: dict, form: str, protocol: int) -> bytes:
    schema = SCHEMAS[form]
    if fmt == "safetensors":
        return safetensors_io.dumps(state)
    if fmt == "torch":
        return torch_zip_bytes(state)
    if fmt == "megengine":
        out = {}
        for k, a in state.items():
            info = schema.get(k)
            try:
                out[k] = to_megengine(a, info) if info is not None and a.shape == info.shape else a
            except ReparamError:
                out[k] = a
        return pickle.dumps(out, protocol=protocol)
    tree: dict = {}
    for k, a in state.items():
        info = schema.get(k)
        key = k
        if info is not None:
            key = flax_key(k, info)
            if a.shape == info.shape:
                try:
                    a = to_flax(a, info)
                except ReparamError:
                    pass
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                nxt = node[p + "_"] = {}
            node = nxt
        node[leaf] = np.ascontiguousarray(a)
    return _flax_pack(tree)


# --------------------------------------------------------------------------- state mutations

DTYPES = [np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_, np.int8]


@st.composite
def mutated_state(draw, form):
    state = dict(STATES[form])
    keys = list(state)
    ops = draw(
        st.lists(
            st.sampled_from(
                [
                    "none",
                    "delete",
                    "rename",
                    "duplicate",
                    "shape",
                    "dtype",
                    "nan",
                    "negvar",
                    "scalar",
                    "empty",
                    "swap",
                    "extra",
                ]
            ),
            max_size=3,
        )
    )
    for op in ops:
        if not keys or op == "none":
            continue
        k = draw(st.sampled_from(keys))
        a = state.get(k)
        if a is None:
            continue
        if op == "delete":
            del state[k]
        elif op == "rename":
            state[draw(st.sampled_from([k + "x", "module." + k, k.replace(".", "_"), "", "a" * 300]))] = state.pop(k)
        elif op == "duplicate":
            state["module." + k] = a
            state[k.upper()] = a
        elif op == "shape":
            how = draw(st.sampled_from(["flat", "drop", "add", "slice", "transpose"]))
            if how == "flat":
                a = a.reshape(-1)
            elif how == "drop" and a.ndim > 1:
                a = a[..., 0]
            elif how == "add":
                a = a[None]
            elif how == "slice" and a.shape[0] > 1:
                a = a[:-1]
            elif how == "transpose":
                a = a.T
            state[k] = np.ascontiguousarray(a)
        elif op == "dtype":
            state[k] = a.astype(draw(st.sampled_from(DTYPES)))
        elif op == "nan":
            b = a.astype(np.float32).copy().reshape(-1)
            if b.size:
                b[draw(st.integers(0, b.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38]))
            state[k] = b.reshape(a.shape)
        elif op == "negvar":
            vk = draw(st.sampled_from([x for x in keys if x.endswith("running_var")] or [k]))
            if vk in state:
                state[vk] = -np.abs(state[vk]) - draw(st.sampled_from([0.0, 1.0, 1e-30]))
        elif op == "scalar":
            state[k] = np.float32(draw(st.floats(allow_nan=True)))
            state[k] = np.asarray(state[k])
        elif op == "empty":
            state[k] = np.zeros((0,) + a.shape[1:], a.dtype)
        elif op == "swap":
            k2 = draw(st.sampled_from(keys))
            if k2 in state:
                state[k], state[k2] = state[k2], a
        elif op == "extra":
            state["extra." + k] = a
    return state


# --------------------------------------------------------------------------- byte mutations


def _patch(data: bytearray, pos: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if 0 <= pos <= len(data) - size:
        data[pos : pos + size] = struct.pack(fmt, value)


def _find_all(data: bytes, sig: bytes, limit: int = 64) -> list[int]:
    out, i = [], data.find(sig)
    while i >= 0 and len(out) < limit:
        out.append(i)
        i = data.find(sig, i + 1)
    return out


def huge_safetensors(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["length", "shape", "offsets", "dupkey", "dropentry", "nested"]))
    n = struct.unpack("<Q", data[:8])[0]
    if kind == "length":
        return struct.pack("<Q", draw(st.sampled_from([TB, 2**63 - 1, 2**64 - 1, n + 1, len(data)]))) + data[8:]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return data
    k = draw(st.sampled_from(keys))
    text = None
    if kind == "shape":
        header[k]["shape"] = draw(st.sampled_from([[2**39, 2**39], [TB], [1] * 100, [-1], [2**62, 4]]))
    elif kind == "offsets":
        header[k]["data_offsets"] = draw(st.sampled_from([[0, TB], [TB, TB + 4], [0, 2**64], [4, 0]]))
    elif kind == "dropentry":
        del header[k]
    elif kind == "nested":
        text = b"[" * 100000 + b"]" * 100000
    if kind == "dupkey":
        raw = json.dumps(header).encode()
        entry = json.dumps({k: header[k]})[1:-1].encode()
        text = raw[:-1] + b"," + entry + b"}"
    if text is None:
        text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def huge_zip(draw, data: bytes) -> bytes:
    b = bytearray(data)
    kind = draw(st.sampled_from(["cd_sizes", "local_sizes", "eocd", "lying_pickle", "zip64", "bomb"]))
    big = draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 1 << 30]))
    if kind == "cd_sizes":
        for pos in draw(st.lists(st.sampled_from(_find_all(data, b"PK\x01\x02") or [0]), max_size=3)):
            _patch(b, pos + draw(st.sampled_from([20, 24])), "<I", big)
    elif kind == "local_sizes":
        for pos in draw(st.lists(st.sampled_from(_find_all(data, b"PK\x03\x04") or [0]), max_size=3)):
            _patch(b, pos + draw(st.sampled_from([18, 22])), "<I", big)
    elif kind == "eocd":
        pos = data.rfind(b"PK\x05\x06")
        off = draw(st.sampled_from([8, 10, 12, 16]))
        if off in (8, 10):
            _patch(b, pos + off, "<H", big & 0xFFFF)
        else:
            _patch(b, pos + off, "<I", big)
    elif kind == "zip64":
        # an archive whose single storage claims a terabyte through the zip64 fields
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("archive/data.pkl", torch_pickle([("w", np.dtype("<f4"), (2**20, 2**20))]))
            zi = zipfile.ZipInfo("archive/data/0")
            with zf.open(zi, "w", force_zip64=True) as f:
                f.write(b"\0" * 64)
        b = bytearray(buf.getvalue())
        for pos in _find_all(bytes(b), b"\x01\x00\x10\x00") + _find_all(bytes(b), b"\x01\x00\x18\x00"):
            _patch(b, pos + 4, "<Q", TB)
    elif kind == "lying_pickle":
        shape = draw(st.sampled_from([(2**20, 2**20), (TB,), (10, 2**40), (0,), (3, 3)]))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("archive/data.pkl", torch_pickle([("w", np.dtype("<f4"), shape)]))
            zf.writestr("archive/data/0", b"\0" * 36)
        return buf.getvalue()
    elif kind == "bomb":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("archive/data.pkl", torch_pickle([("w", np.dtype("<f4"), (2**26,))]))
            zf.writestr("archive/data/0", b"\0" * (2**28))  # 256 MiB of zeros, ~256 KiB deflated
        return buf.getvalue()
    return bytes(b)


def _global(mod: str, name: str) -> bytes:
    return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"


def hostile_pickles() -> list[bytes]:
    rec = _global("numpy.core.multiarray", "_reconstruct")
    nd = _global("numpy", "ndarray")
    dt = _global("numpy", "dtype") + b"(X\x02\x00\x00\x00f4\x89\x88tR"
    out = [
        # _reconstruct(ndarray, (10**12,), b'b'): a terabyte array
        b"\x80\x02" + rec + b"(" + nd + b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85C\x01btR.",
        # ndarray((2**20, 2**20), 'f4') called directly
        b"\x80\x02" + nd + b"(\x8a\x03\x00\x00\x10\x8a\x03\x00\x00\x10\x86" + dt + b"\x86R.",
        # BUILD with a huge shape and 8 bytes of data
        b"\x80\x02"
        + rec
        + b"("
        + nd
        + b"K\x00\x85C\x01btR(K\x01\x8a\x05\x00\x00\x00\x00\x01K\x10\x86"
        + dt
        + b"\x89C\x08\x00\x00\x00\x00\x00\x00\x00\x00tb.",
        # BINBYTES8 / FRAME / BINUNICODE8 claiming a terabyte
        b"\x80\x04\x8e" + struct.pack("<Q", TB) + b"abc.",
        b"\x80\x04\x95" + struct.pack("<Q", TB) + b"}.",
        b"\x80\x04\x8d" + struct.pack("<Q", 2**63 - 1) + b"abc.",
        b"\x80\x02B" + struct.pack("<I", 0xFFFFFFF0) + b"xyz.",
        # LONG4 of 4 GB
        b"\x80\x02\x8b" + struct.pack("<I", 0xFFFFFFFF) + b"\x00.",
        # deeply nested dicts
        b"\x80\x02" + b"}X\x01\x00\x00\x00a" * 20000 + b"s" * 20000 + b".",
        b"\x80\x02" + b"(" * 100000 + b".",
    ]
    # _frombuffer of one 1 MiB buffer referenced 3000 times (memo): 3 GiB of copies
    fb = _global("numpy.core.numeric", "_frombuffer")
    one = (
        fb
        + b"(B"
        + struct.pack("<I", 1 << 20)
        + b"\0" * (1 << 20)
        + b"q\x00"
        + dt
        + b"\x8a\x03\x00\x00\x04\x85X\x01\x00\x00\x00Ctq\x01R"
    )
    rep = b"".join(
        b"X"
        + struct.pack("<I", len(f"k{i}"))
        + f"k{i}".encode()
        + fb
        + b"(h\x00"
        + dt
        + b"\x8a\x03\x00\x00\x04\x85X\x01\x00\x00\x00CtR"
        for i in range(3000)
    )
    out.append(b"\x80\x02}(X\x01\x00\x00\x00a" + one + rep + b"u.")
    return out


HOSTILE_PICKLES = hostile_pickles()


def huge_pickle(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["frame", "binbytes", "hostile"]))
    b = bytearray(data)
    if kind == "frame":
        for pos in _find_all(data, b"\x95")[:4]:
            if draw(st.booleans()):
                _patch(b, pos + 1, "<Q", draw(st.sampled_from([TB, 2**63 - 1, len(data) * 2])))
        return bytes(b)
    if kind == "binbytes":
        positions = _find_all(data, b"\x8e") + _find_all(data, b"B")
        if positions:
            pos = draw(st.sampled_from(positions))
            _patch(b, pos + 1, "<Q" if data[pos] == 0x8E else "<I", draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF])))
        return bytes(b)
    return draw(st.sampled_from(HOSTILE_PICKLES))


def huge_msgpack(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["bin32", "array32", "map32", "ext_shape", "nested", "ext32"]))
    b = bytearray(data)
    if kind == "bin32":
        for pos in _find_all(data, b"\xc6")[:4]:
            if draw(st.booleans()):
                _patch(b, pos + 1, ">I", 0xFFFFFFFF)
        return bytes(b)
    if kind == "ext32":
        for pos in _find_all(data, b"\xc9")[:4]:
            if draw(st.booleans()):
                _patch(b, pos + 1, ">I", 0xFFFFFFF0)
        return bytes(b)
    if kind == "array32":
        return b"\xdd\xff\xff\xff\xff" + data
    if kind == "map32":
        return b"\xdf\xff\xff\xff\xff" + data
    if kind == "nested":
        return b"\x81\xa1a" * 100000 + b"\xc0"
    shape = draw(st.sampled_from([[2**32, 2**32], [TB], [1] * 100, [-5], ["x"], [2**64 - 1]]))
    payload = msgpack.packb((shape, "float32", b"\0" * 16), use_bin_type=True)
    return msgpack.packb({"w": msgpack.ExtType(1, payload)}, use_bin_type=True)


HUGE = {"safetensors": huge_safetensors, "torch": huge_zip, "megengine": huge_pickle, "flax": huge_msgpack}


@st.composite
def mutated_file(draw, fmt: str):
    form = draw(st.sampled_from(["train", "deploy"]))
    state = draw(mutated_state(form)) if draw(st.booleans()) else dict(STATES[form])
    data = encode(fmt, state, form, draw(st.integers(2, 5)))
    if draw(st.integers(0, 4)) == 0:
        data = HUGE[fmt](draw, data)
    ops = draw(st.lists(st.sampled_from(["flip", "truncate", "overwrite", "insert", "delete", "none"]), max_size=4))
    b = bytearray(data)
    for op in ops:
        if not b:
            break
        pos = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del b[pos:]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            b[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del b[pos : pos + draw(st.integers(1, 4096))]
    return fmt, bytes(b)


# --------------------------------------------------------------------------- harness


class Recorder:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.counts: dict = collections.defaultdict(collections.Counter)
        self.cases: collections.Counter = collections.Counter()
        self.failures: list[dict] = []
        self.slowest = 0.0

    def call(self, component: str, label: str, fn, *args, **kwargs):
        """Run fn under the per-case alarm; record the outcome; return (ok, value)."""
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        t0 = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
            outcome, ok = "result", True
        except ReparamError as e:
            value, ok = None, False
            outcome = type(e).__name__
            msg = str(e)
            if len(msg) < 10 or "MemoryError" in msg:
                self.fail(component, label, f"{outcome} with an unclear message: {msg[:300]!r}")
        except CaseTimeout:
            value, ok, outcome = None, False, "TIMEOUT"
            self.fail(component, label, f"no outcome within {self.timeout} s")
        except MemoryError:
            value, ok, outcome = None, False, "MemoryError"
            self.fail(component, label, "MemoryError (allocation beyond the RLIMIT_AS cap)")
        except Exception as e:
            value, ok, outcome = None, False, f"UNEXPECTED {type(e).__name__}"
            self.fail(component, label, "".join(traceback.format_exception(type(e), e, e.__traceback__))[-1500:])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.slowest = max(self.slowest, time.perf_counter() - t0)
        self.counts[component][outcome] += 1
        return ok, value

    def fail(self, component: str, label: str, detail: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(
                {"component": component, "call": label, "detail": detail, "sample": self.current_sample}
            )

    current_sample = ""


def _read_flax(path: str):
    return read_flax_msgpack(path), "flax"


READERS = {
    "safetensors": lambda p: read_raw(p, "safetensors"),
    "torch": lambda p: read_raw(p, "torch"),
    "megengine": lambda p: read_raw(p, "megengine"),
    "flax": _read_flax,
}


def run_readers(rec: Recorder, workdir: str, per_format: int, derandomize: bool) -> None:
    path_of = {fmt: os.path.join(workdir, "case" + EXT[fmt]) for fmt in FORMATS}

    for fmt in FORMATS:

        @settings(
            max_examples=per_format,
            deadline=None,
            database=None,
            derandomize=derandomize,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=mutated_file(fmt), other=st.sampled_from(FORMATS), ext=st.sampled_from([".bin", None]))
        def one(case, other, ext):
            fmt_, data = case
            path = path_of[fmt_] if ext is None else path_of[fmt_] + ext
            with open(path, "wb") as f:
                f.write(data)
            rec.current_sample = f"{fmt_} {len(data)} bytes head={data[:24]!r}"
            rec.cases[fmt_] += 1
            rec.call(fmt_, "detect_format", detect_format, path)
            ok, got = rec.call(fmt_, "read_any", read_raw, path)
            rec.call(fmt_, f"reader[{fmt_}]", READERS[fmt_], path)
            rec.call(fmt_, f"reader[{other}]", READERS[other], path)
            if ok:
                raw, f2 = got
                ok2, neutral = rec.call(fmt_, "to_neutral", to_neutral, raw, SPEC, f2, None, path)
                if ok2 and neutral[1] == "train":
                    rec.call(fmt_, "reparameterize_state", reparameterize_state, SPEC, neutral[0])
            os.unlink(path)

        one()


def run_convert(rec: Recorder, workdir: str, n: int, derandomize: bool) -> None:
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=derandomize,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=st.sampled_from(FORMATS).flatmap(mutated_file),
        to_fmt=st.sampled_from(FORMATS),
        deploy=st.booleans(),
        nc=st.sampled_from([None, 10]),
    )
    def one(case, to_fmt, deploy, nc):
        fmt, data = case
        src = os.path.join(workdir, "src" + EXT[fmt])
        dst = os.path.join(workdir, "dst" + EXT[to_fmt])
        with open(src, "wb") as f:
            f.write(data)
        rec.current_sample = f"convert {fmt}->{to_fmt} {len(data)} bytes head={data[:24]!r}"
        rec.cases["convert"] += 1
        rec.call(
            "convert",
            "convert",
            convert,
            src,
            dst,
            MODEL,
            to_deploy=deploy,
            to_format=to_fmt,
            num_classes=nc,
            overwrite=True,
        )
        for p in (src, dst):
            if os.path.exists(p):
                os.unlink(p)
        leftovers = [x for x in os.listdir(workdir) if x.endswith(".tmp")]
        if leftovers:
            rec.fail("convert", "temp files", f"left behind: {leftovers}")

    one()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-format", type=int, required=True)
    ap.add_argument("--convert", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--derandomize", action="store_true")
    ap.add_argument("--mem-mib", type=int, default=1536)
    ap.add_argument("--case-timeout", type=float, default=20.0)
    args = ap.parse_args()

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm + args.mem_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)

    rec = Recorder(args.case_timeout)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        run_readers(rec, workdir, args.per_format, args.derandomize)
        run_convert(rec, workdir, args.convert, args.derandomize)
    result = {
        "cases": dict(rec.cases),
        "total_cases": sum(rec.cases.values()),
        "outcomes": {k: dict(v) for k, v in rec.counts.items()},
        "failures": rec.failures,
        "seconds": round(time.time() - t0, 1),
        "slowest_call_s": round(rec.slowest, 3),
        "rlimit_as_bytes": cap,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
