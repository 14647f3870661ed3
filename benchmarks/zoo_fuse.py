"""The models people actually have (issue 25): timm, ultralytics and mmpretrain models through the
library's own hand-written fuse and through our two generic passes, counted the same way.

For each model (random weights, BN running statistics randomized, eval mode, small input; nothing
is downloaded) it reports op counts BN / Conv / Add / Linear of
  * torch: the unfused model, the library's own fuse (timm.utils.reparameterize_model, ultralytics
    `model.fuse()`, mmpretrain `switch_to_deploy()`), and ours (`backends.torch.fuse`) -- all three
    counted on the graph `backends.torch.graph_fuse.capture` gives (torch.fx, else torch.export):
    call_module nodes by module class, call_function / call_method nodes by target;
  * ONNX: the unfused model's export, the library-fused model's export, and ours (the unfused
    export through `reparam fuse`'s pass, backends.onnx.fuse_model) -- ONNX node op types
    (BN = BatchNormalization, Linear = Gemm + MatMul, so attention matmuls count as Linear);
the max relative error (max|y - y0| / max|y0|, first output tensor) of each against the unfused
torch model, and whether ours is at or below the library's own fuse in each count ("<=lib": the
columns where it is not are named). A model that fails to build, trace or export is a row with the
error, never a crash. A report, not a test (tests/zoo tests the environment).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/zoo_fuse.py [--only NAME[,NAME]] [--skip-onnx]
        [--out benchmarks/zoo_fuse.md] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import operator
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backends.onnx as bo
import backends.torch as bt
from backends.torch import zoo
from backends.torch.graph_fuse import capture

KINDS = ("BN", "Conv", "Add", "Linear")
aten = torch.ops.aten

# ----------------------------------------------------------------------------- the models


@dataclass
class Case:
    name: str
    source: str  # timm | ultralytics | mmpretrain
    build: Callable[[], nn.Module]
    lib_fuse: Callable[[nn.Module], nn.Module]  # returns the fused copy; never touches its argument
    size: int = 128
    note: str = ""


def _timm(name: str, size: int = 128, **kw: Any) -> Case:
    def build() -> nn.Module:
        timm = zoo.import_timm()
        return timm.create_model(name, pretrained=False, **kw)

    def lib_fuse(m: nn.Module) -> nn.Module:
        timm = zoo.import_timm()
        return timm.utils.reparameterize_model(m, inplace=False)

    return Case(name, "timm", build, lib_fuse, size)


# one small model from each timm file that defines reparameterize / fuse / switch_to_deploy
TIMM = [
    _timm("repvgg_a0"),  # byobnet
    _timm("mobileone_s0"),  # byobnet
    _timm("fastvit_t8"),  # fastvit
    _timm("fastvit_mci0"),  # fastvit (MobileCLIP image tower)
    _timm("repvit_m0_9"),  # repvit
    _timm("ghostnetv3_050"),  # ghostnet
    _timm("lcnetv2_small"),  # lcnetv2
    _timm("levit_128s", img_size=128),  # levit (linear form)
    _timm("levit_conv_128s", img_size=128),  # levit (conv form)
    _timm("efficientvit_m0", img_size=128),  # efficientvit_msra
    _timm("efficientvim_m1"),  # efficientvim
    _timm("repghostnet_050"),  # repghost
    _timm("nextvit_small"),  # nextvit
    _timm("iformer_t"),  # iformer
    _timm("shvit_s1"),  # shvit
    _timm("tiny_vit_5m_224"),  # tiny_vit (windowed attention pads any size)
]


def _ultra(yaml: str, name: str) -> Case:
    def build() -> nn.Module:
        zoo.import_ultralytics()
        from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel

        cls = RTDETRDetectionModel if "rtdetr" in yaml else DetectionModel
        with contextlib.redirect_stdout(io.StringIO()):
            return cls(yaml, verbose=False)

    def lib_fuse(m: nn.Module) -> nn.Module:
        with contextlib.redirect_stdout(io.StringIO()):
            return copy.deepcopy(m).fuse(verbose=False)

    return Case(name, "ultralytics", build, lib_fuse, 128)


ULTRA = [
    _ultra("yolov8n.yaml", "YOLOv8n"),
    _ultra("yolov9t.yaml", "YOLOv9t"),
    _ultra("yolov10n.yaml", "YOLOv10n"),
    _ultra("yolo11n.yaml", "YOLO11n"),
    _ultra("rtdetr-l.yaml", "RT-DETR-l"),
    _ultra("yolov6n.yaml", "YOLOv6n"),
]


def _mmpre(config: str | dict, name: str, size: int = 128) -> Case:
    """`config`: a model-index name (mmpretrain.get_model), or the model dict itself."""

    def build() -> nn.Module:
        mmpretrain = zoo.import_mmpretrain()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(config, dict):
                from mmpretrain.registry import MODELS
                from mmpretrain.utils import register_all_modules

                register_all_modules()
                return MODELS.build(copy.deepcopy(config))
            return mmpretrain.get_model(config, pretrained=False)

    def lib_fuse(m: nn.Module) -> nn.Module:
        m = copy.deepcopy(m)
        for sub in (m, getattr(m, "backbone", None), getattr(m, "neck", None), getattr(m, "head", None)):
            if sub is not None and hasattr(sub, "switch_to_deploy"):
                sub.switch_to_deploy()
                break
        return m

    return Case(name, "mmpretrain", build, lib_fuse, size)


MMPRE = [
    _mmpre("mobileone-s0_8xb32_in1k", "mmpretrain MobileOne-S0"),
    _mmpre("repvgg-a0_8xb32_in1k", "mmpretrain RepVGG-A0"),
    # RepLKNet-31B is the smallest RepLKNet. Its packaged config cannot be loaded (mmpretrain 1.2.0's
    # _base_/models/replknet-31B_in1k.py holds a `from mmpretrain.models import ...` line, which
    # mmengine 0.10 takes for a lazy-import config and refuses in a plain inheritance chain), so the
    # model dict of that file is given here.
    _mmpre(
        dict(
            type="ImageClassifier",
            backbone=dict(type="RepLKNet", arch="31B", out_indices=(3,)),
            neck=dict(type="GlobalAveragePooling"),
            head=dict(type="LinearClsHead", num_classes=1000, in_channels=1024),
        ),
        "mmpretrain RepLKNet-31B",
    ),
    _mmpre("repmlp-base_3rdparty_8xb64_in1k", "mmpretrain RepMLPNet-B224", 224),  # RepMLP needs its 224 input
]

CASES = TIMM + ULTRA + MMPRE

# ----------------------------------------------------------------------------- helpers


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random affine and running statistics in every BN (so a fused BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                c = m.running_mean.shape[0]
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(0.1 * torch.randn(c, generator=g))


def first_tensor(y: Any) -> torch.Tensor | None:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        for v in y:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def rel_err(y: Any, ref: np.ndarray) -> float:
    y = np.asarray(y, np.float64)
    if y.shape != ref.shape:
        return float("inf")
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


_BN_FNS = {F.batch_norm, torch.batch_norm, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_CONV_FNS = {F.conv1d, F.conv2d, F.conv3d, torch.conv2d, aten.conv2d.default, aten.convolution.default}
_ADD_FNS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor, aten.add.Scalar}
_LINEAR_FNS = {F.linear, torch._C._nn.linear, aten.linear.default, aten.addmm.default}


def torch_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """BN / Conv / Add / Linear nodes of a captured graph (modules by class, functions by target)."""
    modules = dict(gm.named_modules())
    c = dict.fromkeys(KINDS, 0)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = modules[n.target]
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c["BN"] += 1
            elif isinstance(m, nn.modules.conv._ConvNd):
                c["Conv"] += 1
            elif isinstance(m, nn.Linear):
                c["Linear"] += 1
        elif n.op == "call_function":
            t = n.target
            if t in _BN_FNS:
                c["BN"] += 1
            elif t in _CONV_FNS:
                c["Conv"] += 1
            elif t in _ADD_FNS:
                c["Add"] += 1
            elif t in _LINEAR_FNS:
                c["Linear"] += 1
        elif n.op == "call_method" and n.target in ("add", "add_", "__add__", "__iadd__"):
            c["Add"] += 1
    return c


def onnx_counts(model: Any) -> dict[str, int]:
    h = bo.op_histogram(model)
    return {
        "BN": h.get("BatchNormalization", 0),
        "Conv": h.get("Conv", 0),
        "Add": h.get("Add", 0),
        "Linear": h.get("Gemm", 0) + h.get("MatMul", 0),
    }


def fmt_counts(c: dict[str, int] | None) -> str:
    return "/".join(str(c[k]) for k in KINDS) if c else "-"


def at_or_below(ours: dict[str, int] | None, lib: dict[str, int] | None) -> str:
    if ours is None or lib is None:
        return "-"
    worse = [k for k in KINDS if ours[k] > lib[k]]
    return "yes" if not worse else "no: " + ",".join(worse)


def short(e: BaseException) -> str:
    s = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return s.replace("|", "/")[:160]


def run_torch(m: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        t = first_tensor(m(x))
    assert t is not None, "no tensor output"
    return t.detach().double().numpy()


def export_onnx(m: nn.Module, x: torch.Tensor, path: str) -> tuple[Any, str]:
    """TorchScript exporter first (as benchmarks/fuse_registry.py), the dynamo exporter if it fails."""
    errors = []
    for dynamo in (False, True):
        try:
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    m, (x,), path, input_names=["input"], opset_version=17 if not dynamo else 18, dynamo=dynamo
                )
            return bo.load(path), ("torchscript" if not dynamo else "dynamo")
        except Exception as e:
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {short(e)}")
    raise RuntimeError("; ".join(errors))


def run_onnx(model: Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], np.float64)


# ----------------------------------------------------------------------------- one row


@dataclass
class Row:
    name: str
    source: str
    input: str = ""
    params_m: float = 0.0
    counts: dict[str, dict[str, int] | None] = field(default_factory=dict)
    errs: dict[str, float | None] = field(default_factory=dict)
    capture: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    left: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # pass -> (reason, count), most frequent
    seconds: float = 0.0


def _reasons(report: Any, top: int = 3) -> list[tuple[str, int]]:
    """The most frequent reasons a pass left a candidate alone (node and module names replaced by <node>)."""
    import re
    from collections import Counter

    def norm(reason: str) -> str:
        return re.sub(r"[^\s(),]*[_/][^\s(),]*", "<node>", reason)[:160]

    return Counter(norm(str(a.reason)) for a in report.left).most_common(top)


def model_row(case: Case, tmp: str, skip_onnx: bool) -> Row:
    t0 = time.time()
    r = Row(case.name, case.source, f"1x3x{case.size}x{case.size}")
    try:
        torch.manual_seed(0)
        model = case.build().eval()
        randomize_bn(model)
        r.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        x = torch.randn(1, 3, case.size, case.size, generator=torch.Generator().manual_seed(1))
        y0 = run_torch(model, x)
    except Exception as e:
        r.notes.append(f"build/forward: {short(e)}")
        r.seconds = time.time() - t0
        return r

    def step(label: str, fn: Callable[[], Any]) -> Any:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                return fn()
        except Exception as e:
            r.notes.append(f"{label}: {short(e)}")
            if os.environ.get("ZOO_FUSE_DEBUG"):
                traceback.print_exc()
            return None

    def count_torch(key: str, m: nn.Module) -> None:
        got = step(f"capture {key}", lambda: capture(copy.deepcopy(m), x))
        if got is not None:
            gm, how = got
            r.counts[key] = torch_counts(gm)
            r.capture[key] = how
        else:
            r.counts[key] = None

    count_torch("torch", model)
    lib = step("library fuse", lambda: case.lib_fuse(model).eval())
    if lib is not None:
        count_torch("torch lib", lib)
        r.errs["lib"] = step("library fuse run", lambda: rel_err(run_torch(lib, x), y0))
    else:
        r.counts["torch lib"] = None
    ours = step("backends.torch.fuse", lambda: bt.fuse(model, x))
    if ours is not None:
        r.counts["torch ours"] = torch_counts(ours)
        rep = ours.fuse_report
        r.capture["torch ours"] = (
            f"{rep.capture.replace('captured with ', '')}: {len(rep.fused)} fused / {len(rep.left)} left"
        )
        r.left["torch"] = _reasons(rep)
        r.errs["torch ours"] = step("backends.torch.fuse run", lambda: rel_err(run_torch(ours, x), y0))
    else:
        r.counts["torch ours"] = None

    if not skip_onnx:
        xn = x.numpy()
        src = step("onnx export", lambda: export_onnx(model, x, os.path.join(tmp, "src.onnx")))
        r.counts["onnx"] = onnx_counts(src[0]) if src else None
        if src:
            r.capture["onnx"] = src[1]
            r.errs["onnx"] = step("onnx run", lambda: rel_err(run_onnx(src[0], xn), y0))
            got = step("onnx fuse_model", lambda: bo.fuse_model(src[0]))
            fused = got[0] if got is not None else None
            if got is not None:
                r.capture["onnx ours"] = f"{len(got[1].fused)} fused / {len(got[1].left)} left"
                r.left["onnx"] = _reasons(got[1])
            r.counts["onnx ours"] = onnx_counts(fused) if fused is not None else None
            if fused is not None:
                r.errs["onnx ours"] = step("onnx ours run", lambda: rel_err(run_onnx(fused, xn), y0))
        else:
            r.counts["onnx ours"] = None
        if lib is not None:
            lib_onnx = step("onnx export (lib fused)", lambda: export_onnx(lib, x, os.path.join(tmp, "lib.onnx")))
            r.counts["onnx lib"] = onnx_counts(lib_onnx[0]) if lib_onnx else None
        else:
            r.counts["onnx lib"] = None
    r.seconds = time.time() - t0
    return r


# ----------------------------------------------------------------------------- report

HEADER = (
    "| model | src | input | params M | torch unfused | torch lib fuse | torch ours | ours <= lib (torch) "
    "| ONNX unfused | ONNX lib fuse | ONNX ours | ours <= lib (ONNX) | err lib | err ours torch | err ours ONNX "
    "| ours torch: capture, fused / left | ours ONNX: fused / left | notes |"
)


def _e(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def row_md(r: Row) -> str:
    c = r.counts
    cells = [
        r.name,
        r.source,
        r.input,
        f"{r.params_m:.1f}",
        fmt_counts(c.get("torch")),
        fmt_counts(c.get("torch lib")),
        fmt_counts(c.get("torch ours")),
        at_or_below(c.get("torch ours"), c.get("torch lib")),
        fmt_counts(c.get("onnx")),
        fmt_counts(c.get("onnx lib")),
        fmt_counts(c.get("onnx ours")),
        at_or_below(c.get("onnx ours"), c.get("onnx lib")),
        _e(r.errs.get("lib")),
        _e(r.errs.get("torch ours")),
        _e(r.errs.get("onnx ours")),
        r.capture.get("torch ours", "-"),
        r.capture.get("onnx ours", "-"),
        "; ".join(r.notes).replace("\n", " ") or "",
    ]
    return "| " + " | ".join(cells) + " |"


def versions() -> str:
    out = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("torchvision", "timm", "ultralytics", "mmpretrain", "mmengine", "mmcv", "onnx", "onnxruntime"):
        mod = sys.modules.get(name)
        if mod is None:
            with contextlib.suppress(Exception):
                mod = __import__(name)
        out.append(f"{name} {getattr(mod, '__version__', '?')}")
    return ", ".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=lambda s: s.split(","), help="model names (comma-separated, case-insensitive)")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--out", metavar="FILE.md", help="write the table (with its header) there")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    cases = CASES
    if a.only:
        want = {n.lower() for n in a.only}
        cases = [c for c in CASES if c.name.lower() in want or c.name.lower().split()[-1] in want]
        if not cases:
            p.error(f"--only matched nothing; names: {', '.join(c.name for c in CASES)}")
    rows: list[Row] = []
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    with tempfile.TemporaryDirectory(prefix="reparam-zoo-") as tmp:
        for case in cases:
            r = model_row(case, tmp, a.skip_onnx)
            rows.append(r)
            print(row_md(r), flush=True)
            print(f"    ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    head = (
        f"# benchmarks/zoo_fuse.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), load average at the end {load}; "
        f"torch threads {a.threads}. Versions: {versions()}.\n"
        f"torchvision's C ops were {'shimmed (schemas only)' if zoo.torchvision_ops_shimmed() else 'loaded'}.\n\n"
        "Counts are BN/Conv/Add/Linear. torch: nodes of the captured graph (torch.fx, else torch.export); "
        "ONNX: node op types (Linear = Gemm + MatMul). Errors: max relative error of the first output "
        "against the unfused torch model. ONNX columns: "
        f"{'skipped' if a.skip_onnx else 'TorchScript exporter (dynamo exporter if it fails), opset 17'}.\n\n"
    )
    table = "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1), *map(row_md, rows)]) + "\n"
    reasons = ["", "## Why our passes left candidates alone (most frequent reasons, count)", ""]
    for r in rows:
        for key in ("torch", "onnx"):
            if r.left.get(key):
                got = "; ".join(f"{why.replace('|', '/')} (x{n})" for why, n in r.left[key])
                reasons.append(f"- {r.name}, {key}: {got}")
    table += "\n".join(reasons) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(head + table)
        print(f"wrote {a.out}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
