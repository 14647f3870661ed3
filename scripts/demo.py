"""`reparam demo`: train a multi-branch RepVGG on handwritten digits, re-parameterize it and port
both forms to MegEngine and Flax, with proof that the predictions did not change.

    reparam demo [--out DIR] [--epochs N] [--model NAME] [--seed S] [--no-train]

Data: scikit-learn's bundled digits (1,797 8x8 images, 10 classes; no download), scaled to [0, 1],
upscaled to 32x32 (bilinear), normalised with the training set's mean/std and repeated to 3
channels. The 80/20 stratified split is fixed (SPLIT_SEED, independent of --seed) so the shipped
checkpoint is always scored on images it never saw. --seed sets the initialisation, the batch order
and the (whole-batch) random shifts used as augmentation.

Stages: 1. train in PyTorch (AdamW, one-cycle LR, deterministic algorithms); 2. re-parameterize
(accuracy, identical predictions, parameters, interleaved throughput); 3. port through the neutral
state to MegEngine (the worker in .venv-mge) and Flax, each of which re-parameterizes on its own;
4. write checkpoints in every format and form, the deploy artifacts (ONNX, traced .mge,
StableHLO), summary.json and summary.png; 5. print a table.

Everything is compared with the trained PyTorch model (train form): "same" counts test images
whose predicted class is identical, "max |dlogit|" is the largest absolute logit difference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reparam_core import ReparamError, count_params, get_spec
from reparam_core.errors import BackendUnavailableError, CheckpointError, VerificationError
from reparam_core.safetensors_io import load_file, save_file

from reparam_core.timing import interleaved_throughput, paired_ratio, summarize

ROOT = Path(__file__).resolve().parent.parent
ASSET_DIR = ROOT / "assets" / "demo"

# Training defaults: ~10 s of training on 2 CPU cores, ~99% test accuracy with RepVGG-mini.
DEFAULT_MODEL = "RepVGG-mini"
QUANTIZE_MODELS = "RepVGG-mini,QARepVGG-mini"  # `--quantize`: two models of the same size
DEFAULT_EPOCHS = 10
DEFAULT_SEED = 0
LR = 3e-3
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 32
MAX_SHIFT = 2          # random translation (pixels, same for the whole batch) as augmentation
IMAGE_SIZE = 32
NUM_CLASSES = 10
SPLIT_SEED = 0         # the train/test split never changes (the shipped checkpoint relies on it)
TEST_FRACTION = 0.2
TIMING_REPEATS = 9     # interleaved throughput measurement: median of this many rounds
GALLERY_SIZE = 16

State = dict[str, np.ndarray]
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def asset_path(model: str) -> Path:
    return ASSET_DIR / f"{model}-digits.safetensors"


# --------------------------------------------------------------------------- data

class Digits:
    """The fixed split of sklearn's digits, preprocessed to NCHW float32 (N, 3, 32, 32)."""

    def __init__(self, size: int = IMAGE_SIZE) -> None:
        import torch
        import torch.nn.functional as F
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0            # (1797, 8, 8) in [0, 1]
        labels = digits.target.astype(np.int64)
        idx = np.arange(len(images))
        self.train_idx, self.test_idx = train_test_split(
            idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
        up = F.interpolate(torch.from_numpy(images)[:, None], size=(size, size), mode="bilinear",
                           align_corners=False).numpy()
        self.mean = float(up[self.train_idx].mean())
        self.std = float(up[self.train_idx].std())
        x = np.repeat((up - self.mean) / self.std, 3, axis=1).astype(np.float32)
        self.x_train, self.y_train = np.ascontiguousarray(x[self.train_idx]), labels[self.train_idx]
        self.x_test, self.y_test = np.ascontiguousarray(x[self.test_idx]), labels[self.test_idx]
        self.raw_test = images[self.test_idx]                        # 8x8, for the figure
        self.size = size

    def describe(self) -> dict:
        return {"source": "sklearn.datasets.load_digits", "n_train": int(len(self.y_train)),
                "n_test": int(len(self.y_test)), "classes": NUM_CLASSES,
                "input_shape": [3, self.size, self.size], "split_seed": SPLIT_SEED,
                "test_fraction": TEST_FRACTION, "stratified": True,
                "preprocess": f"x/16, bilinear 8->{self.size}, (x-{self.mean:.6f})/{self.std:.6f}, "
                              "gray repeated to 3 channels",
                "mean": self.mean, "std": self.std}


# --------------------------------------------------------------------------- training

class _Bar:
    """tqdm on an interactive stderr; one line per epoch otherwise."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True)
            except ImportError:
                pass

    def step(self, n: int, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(model_name: str, data: Digits, *, epochs: int, seed: int, quiet: bool = False):
    """Train the train-form model in PyTorch; returns (model, history, info)."""
    import torch
    import torch.nn.functional as F

    from backends.torch import create_model, predict

    torch.manual_seed(seed)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        deterministic = True
    except Exception:
        deterministic = False
    model = create_model(model_name, num_classes=NUM_CLASSES)
    gen = torch.Generator().manual_seed(seed)
    x_train = torch.from_numpy(data.x_train)
    y_train = torch.from_numpy(data.y_train)
    n = len(y_train)
    steps_per_epoch = (n + BATCH_SIZE - 1) // BATCH_SIZE
    history: list[dict] = []
    info = {"framework": "torch " + torch.__version__, "optimizer": "AdamW", "lr": LR,
            "weight_decay": WEIGHT_DECAY, "schedule": "one-cycle (20% warm-up, cosine)",
            "batch_size": BATCH_SIZE, "epochs": epochs, "seed": seed,
            "augmentation": f"random shift of up to {MAX_SHIFT} px (per batch)",
            "deterministic_algorithms": deterministic, "torch_threads": torch.get_num_threads()}
    if epochs <= 0:
        torch.use_deterministic_algorithms(previous)
        return model, history, info
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.2)
    pad_value = float(x_train.min())
    bar = _Bar(epochs * steps_per_epoch, f"train {model_name}") if not quiet else None
    t0 = time.perf_counter()
    try:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(0, n, BATCH_SIZE):
                b = order[i:i + BATCH_SIZE]
                xb = x_train[b]
                if MAX_SHIFT:
                    dx, dy = torch.randint(0, 2 * MAX_SHIFT + 1, (2,), generator=gen).tolist()
                    xb = F.pad(xb, (MAX_SHIFT,) * 4, value=pad_value)
                    xb = xb[:, :, dy:dy + data.size, dx:dx + data.size]
                out = model(xb)
                loss = F.cross_entropy(out, y_train[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(b)
                correct += int((out.argmax(1) == y_train[b]).sum())
                seen += len(b)
                if bar:
                    bar.step(1, loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}")
            test_acc = float((predict(model, data.x_test).argmax(1) == data.y_test).mean())
            history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen,
                            "test_acc": test_acc})
            if bar:
                bar.epoch(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}  "
                          f"train acc {correct / seen:.2%}  test acc {test_acc:.2%}")
    finally:
        if bar:
            bar.close()
        torch.use_deterministic_algorithms(previous)
    info["seconds"] = time.perf_counter() - t0
    return model, history, info


# --------------------------------------------------------------------------- measurements

def compare(ref: np.ndarray, out: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of `out` and how it agrees with the reference logits `ref`."""
    same = int((ref.argmax(1) == out.argmax(1)).sum())
    return {"accuracy": float((out.argmax(1) == labels).mean()), "same_predictions": same,
            "n": int(len(labels)), "identical": same == len(labels),
            "max_abs_logit_diff": float(np.abs(ref.astype(np.float64) - out).max())}


def max_state_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    if set(a) != set(b):
        raise CheckpointError(f"state keys differ: {sorted(set(a) ^ set(b))[:5]}")
    return max(float(np.abs(np.asarray(a[k], np.float64) - b[k]).max()) for k in a)


# MegEngine throughput and the traced artifact on the whole test set: MegEngine only runs in
# .venv-mge; the worker protocol has no timing op, so a short script runs there once.
_MGE_SCRIPT = r"""
import json, sys
import numpy as np
from backends.megengine import create_model, load_state, predict, reparameterize, run_traced
from reparam_core.safetensors_io import load_file, save_file
req = json.loads(sys.argv[1])
x = load_file(req["input"])[0]["x"]
train = load_state(create_model(req["model"], num_classes=req["num_classes"]),
                   load_file(req["state"])[0])
deploy = reparameterize(train)
from reparam_core.timing import interleaved_times
times = interleaved_times({"train": lambda: predict(train, x), "deploy": lambda: predict(deploy, x)},
                          req["repeats"])
save_file({"y": run_traced(req["artifact"], x)}, req["artifact_output"])
with open(req["result"], "w") as f:
    json.dump(times, f)
"""


def megengine_timing(model: str, state: State, x: np.ndarray, artifact: Path,
                     repeats: int = TIMING_REPEATS) -> tuple[dict[str, dict], np.ndarray]:
    from backends.megengine.remote import mge_python

    exe = mge_python()
    if not exe.exists():
        raise BackendUnavailableError(f"MegEngine environment not found ({exe})")
    with tempfile.TemporaryDirectory(prefix="reparam-demo-") as tmp:
        req = {"model": model, "num_classes": NUM_CLASSES, "repeats": repeats,
               "state": os.path.join(tmp, "state.safetensors"), "input": os.path.join(tmp, "x.safetensors"),
               "artifact": os.fspath(artifact), "artifact_output": os.path.join(tmp, "y.safetensors"),
               "result": os.path.join(tmp, "times.json")}
        save_file(state, req["state"])
        save_file({"x": x}, req["input"])
        proc = subprocess.run([str(exe), "-c", _MGE_SCRIPT, json.dumps(req)], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BackendUnavailableError(f"MegEngine timing failed: {proc.stderr[-1500:]}")
        with open(req["result"]) as f:
            times = json.load(f)
        y = load_file(req["artifact_output"])[0]["y"]
    out: dict[str, Any] = summarize(times, len(x))
    out["deploy_over_train"] = paired_ratio(times["train"], times["deploy"])
    return out, y


# --------------------------------------------------------------------------- files

def write_checkpoints(spec, states: Mapping[str, State], ckpt_dir: Path) -> dict[str, dict]:
    """Every format x form, each written atomically and read back (bit-exact check)."""
    from reparam_core.atomic import atomic_write
    from reparam_core.formats import encode, load_neutral

    ext = {"torch": ".pth", "megengine": ".pkl", "flax": ".msgpack", "safetensors": ".safetensors"}
    out: dict[str, dict] = {}
    for form, state in states.items():
        for fmt, suffix in ext.items():
            path = ckpt_dir / f"{spec.name}-{form}{suffix}"
            atomic_write(os.fspath(path), encode(spec, state, form, fmt), overwrite=True)
            os.chmod(path, 0o666 & ~_UMASK)  # atomic_write's temp file is private (0600)
            back, back_form, back_fmt, _ = load_neutral(os.fspath(path), spec)
            exact = back_form == form and back_fmt == fmt and all(
                np.array_equal(back[k], state[k]) for k in state) and set(back) == set(state)
            if not exact:
                raise CheckpointError(f"{path}: reading it back does not give the state written")
            out[f"{fmt}/{form}"] = {"path": os.fspath(path), "format": fmt, "form": form,
                                    "bytes": path.stat().st_size, "read_back_exact": exact}
    return out


def _onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _stablehlo_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    from backends.flax import load_stablehlo

    fn = load_stablehlo(path)
    return np.concatenate([fn(x[i:i + 1]) for i in range(len(x))])


# --------------------------------------------------------------------------- the demo

def _gallery(data: Digits, preds: Mapping[str, np.ndarray], k: int = GALLERY_SIZE) -> dict:
    """Test images for the figure: every misclassified one (up to half the grid), then the
    first of each class, then the next ones in order."""
    ref = preds["torch/train"]
    wrong = [int(i) for i in np.flatnonzero(ref != data.y_test)][: k // 2]
    chosen = list(wrong)
    for c in range(NUM_CLASSES):
        for i in np.flatnonzero(data.y_test == c):
            if int(i) not in chosen:
                chosen.append(int(i))
                break
    for i in range(len(data.y_test)):
        if len(chosen) >= k:
            break
        if i not in chosen:
            chosen.append(i)
    chosen = chosen[:k]
    return {"test_positions": chosen,
            "dataset_indices": [int(data.test_idx[i]) for i in chosen],
            "labels": [int(data.y_test[i]) for i in chosen],
            "predictions": {name: [int(p[i]) for i in chosen] for name, p in preds.items()},
            "all_agree": [bool(len({int(p[i]) for p in preds.values()}) == 1) for i in chosen]}


def run_demo(*, out: str | os.PathLike = "demo-out", epochs: int = DEFAULT_EPOCHS,
             model: str = DEFAULT_MODEL, seed: int = DEFAULT_SEED, no_train: bool = False,
             plot: bool = True, quiet: bool = False, save_asset: bool = False) -> dict:
    """Run every stage; returns the summary (also written to OUT/summary.json)."""
    t_start = time.perf_counter()
    stages: dict[str, float] = {}

    def mark(name: str, t0: float) -> float:
        stages[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    spec = get_spec(model, NUM_CLASSES)  # UnknownModelError with close names
    model = spec.name  # an alias (repvgg_a0) names files and requests by the registry name
    out_dir = Path(out)
    ckpt_dir, art_dir = out_dir / "checkpoints", out_dir / "deploy"

    import torch

    from backends import torch as bt

    t = time.perf_counter()
    data = Digits()
    x_test, y_test = data.x_test, data.y_test
    t = mark("data", t)

    # 1. train (or load the shipped checkpoint)
    if no_train:
        path = asset_path(model)
        if not path.exists():
            raise CheckpointError(f"no shipped checkpoint for {model} ({path}); run without --no-train")
        state, meta = load_file(path)
        torch_train = bt.load_state(bt.create_model(model, num_classes=NUM_CLASSES), state)
        history = json.loads(meta.get("history", "[]"))
        train_info = {"loaded_from": os.path.relpath(path, ROOT), "seed": seed,
                      "trained_with": json.loads(meta.get("train_info", "{}"))}
        say(f"loaded the trained {model} from {os.path.relpath(path, ROOT)} (--no-train)")
    else:
        say(f"training {model} on {len(data.y_train)} digits for {epochs} epochs (seed {seed})")
        torch_train, history, train_info = train(model, data, epochs=epochs, seed=seed, quiet=quiet)
    torch_train.eval()
    t = mark("train", t)
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no folder behind
    art_dir.mkdir(parents=True, exist_ok=True)
    if save_asset and not no_train:
        path = asset_path(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        acc = float((bt.predict(torch_train, x_test).argmax(1) == y_test).mean())
        save_file(bt.export_state(torch_train), path, {
            "model": model, "form": "train", "format": "pt", "producer": "reparam demo",
            "test_accuracy": f"{acc:.6f}", "history": json.dumps(history),
            "train_info": json.dumps(train_info), "data": json.dumps(data.describe())})
        say(f"saved the trained checkpoint to {os.path.relpath(path, ROOT)}")

    # 2. re-parameterize in PyTorch
    torch_deploy = bt.reparameterize(torch_train).eval()
    state_train, state_deploy = bt.export_state(torch_train), bt.export_state(torch_deploy)
    logits = {"torch/train": bt.predict(torch_train, x_test), "torch/deploy": bt.predict(torch_deploy, x_test)}
    with torch.inference_mode():
        xt = torch.from_numpy(x_test)
        throughput = {"torch": interleaved_throughput(
            {"train": lambda: torch_train(xt), "deploy": lambda: torch_deploy(xt)}, len(x_test),
            TIMING_REPEATS)}
    t = mark("reparameterize (torch)", t)

    # 3a. MegEngine through the worker: load the torch train state, predict; re-parameterize
    # in MegEngine and predict; also load torch's deploy state directly.
    from backends.megengine.remote import shared

    say("porting to MegEngine (worker in .venv-mge)")
    worker = shared()
    mge_kw = dict(model=model, num_classes=NUM_CLASSES, x=x_test)
    logits["megengine/train"] = worker.predict(form="train", state=state_train, **mge_kw)
    logits["megengine/deploy"], mge_deploy_state = worker.predict(
        form="train", state=state_train, reparameterize=True, return_state=True, **mge_kw)
    mge_from_torch_deploy = worker.predict(form="deploy", state=state_deploy, **mge_kw)
    mge_art = art_dir / f"{model}.mge"
    y_mge_art_first = worker.export_traced(form="deploy", state=state_deploy, artifact=mge_art,
                                           model=model, num_classes=NUM_CLASSES, x=x_test[:1])
    throughput["megengine"], y_mge_art = megengine_timing(model, state_train, x_test, mge_art)
    t = mark("port: megengine", t)

    # 3b. Flax
    say("porting to Flax")
    from backends import flax as bf

    flax_train = bf.load_state(bf.empty_model(model, num_classes=NUM_CLASSES), state_train)
    flax_deploy = bf.reparameterize(flax_train)
    flax_deploy_state = bf.export_state(flax_deploy)
    logits["flax/train"] = bf.predict(flax_train, x_test)
    logits["flax/deploy"] = bf.predict(flax_deploy, x_test)
    flax_from_torch_deploy = bf.predict(
        bf.load_state(bf.empty_model(model, num_classes=NUM_CLASSES, deploy=True), state_deploy), x_test)
    throughput["flax"] = interleaved_throughput(
        {"train": lambda: bf.predict(flax_train, x_test), "deploy": lambda: bf.predict(flax_deploy, x_test)},
        len(x_test), TIMING_REPEATS)
    t = mark("port: flax", t)

    # 4. files: checkpoints and deploy artifacts
    say(f"writing checkpoints and deploy artifacts to {out_dir}")
    checkpoints = write_checkpoints(spec, {"train": state_train, "deploy": state_deploy}, ckpt_dir)
    onnx_path = Path(bt.export_onnx(torch_train, art_dir / f"{model}.onnx",
                                    input_shape=(1, 3, data.size, data.size)))
    shlo_path = Path(bf.export_stablehlo(flax_train, art_dir / f"{model}.stablehlo",
                                         input_shape=(1, 3, data.size, data.size)))
    logits["artifact/onnx"] = _onnx_outputs(onnx_path, x_test)
    logits["artifact/mge"] = y_mge_art
    logits["artifact/stablehlo"] = _stablehlo_outputs(shlo_path, x_test)
    t = mark("write files", t)

    # figures
    ref = logits["torch/train"]
    results = {name: compare(ref, y, y_test) for name, y in logits.items()}
    for fw in ("torch", "megengine", "flax"):
        tp = throughput[fw]
        for form in ("train", "deploy"):
            results[f"{fw}/{form}"]["images_per_s"] = tp[form]["images_per_s"]
    porting = {
        "megengine_train_vs_torch_train": compare(logits["torch/train"], logits["megengine/train"], y_test),
        "megengine_deploy_vs_torch_deploy": compare(logits["torch/deploy"], logits["megengine/deploy"], y_test),
        "megengine_loaded_torch_deploy_vs_torch_deploy": compare(logits["torch/deploy"], mge_from_torch_deploy, y_test),
        "flax_train_vs_torch_train": compare(logits["torch/train"], logits["flax/train"], y_test),
        "flax_deploy_vs_torch_deploy": compare(logits["torch/deploy"], logits["flax/deploy"], y_test),
        "flax_loaded_torch_deploy_vs_torch_deploy": compare(logits["torch/deploy"], flax_from_torch_deploy, y_test),
        "mge_artifact_first_image_vs_torch_deploy": float(np.abs(y_mge_art_first - logits["torch/deploy"][:1]).max()),
        "fused_state_max_diff": {"megengine_vs_torch": max_state_diff(state_deploy, mge_deploy_state),
                                 "flax_vs_torch": max_state_diff(state_deploy, flax_deploy_state)},
    }
    preds = {k: v.argmax(1) for k, v in logits.items()}
    frameworks = [k for k in results if not k.startswith("artifact/")]
    deploy_keys = [k for k in results if k.endswith("/deploy") or k.startswith("artifact/")]
    summary = {
        "model": model,
        "out": os.fspath(out_dir),
        "command": "reparam demo " + " ".join(
            [f"--out {out}", f"--epochs {epochs}", f"--model {model}", f"--seed {seed}"]
            + (["--no-train"] if no_train else [])),
        "data": data.describe(),
        "training": {**train_info, "history": history},
        "params": {"train": count_params(spec, "train"), "deploy": count_params(spec, "deploy")},
        "reference": "torch/train (the trained PyTorch model); same_predictions and "
                     "max_abs_logit_diff are measured against it on the test set",
        "results": results,
        "throughput": {fw: {"batch": len(x_test), "repeats": TIMING_REPEATS,
                            "train_images_per_s": tp["train"]["images_per_s"],
                            "deploy_images_per_s": tp["deploy"]["images_per_s"],
                            "deploy_over_train": tp["deploy_over_train"],
                            "method": "rounds time train then deploy form back to back on the "
                                      "test batch after one warm-up; images/s from the median "
                                      "time, the ratio is the median of per-round ratios",
                            "train_runs_s": tp["train"]["runs_s"], "deploy_runs_s": tp["deploy"]["runs_s"]}
                       for fw, tp in throughput.items()},
        "porting": porting,
        "all_identical": {"all": all(results[k]["identical"] for k in results),
                          "deploy_all_frameworks": all(results[k]["identical"] for k in deploy_keys),
                          "frameworks": all(results[k]["identical"] for k in frameworks)},
        "checkpoints": checkpoints,
        "artifacts": {"onnx": {"path": os.fspath(onnx_path), "input_shape": [1, 3, data.size, data.size],
                               "runtime": "onnxruntime", **results["artifact/onnx"]},
                      "mge": {"path": os.fspath(mge_art), "input": "data (NCHW, any batch)",
                              "runtime": "megengine GraphInference", **results["artifact/mge"]},
                      "stablehlo": {"path": os.fspath(shlo_path), "input_shape": [1, 3, data.size, data.size],
                                    "runtime": "jax.export", **results["artifact/stablehlo"]}},
        "gallery": _gallery(data, preds),
        "environment": _environment(worker),
        "stages_s": stages,
    }
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    if plot:
        from scripts.demo_plot import plot_summary

        summary["figure"] = os.fspath(out_dir / "summary.png")
        plot_summary(summary, out_dir / "summary.png", images=data.raw_test)
    mark("figure", t)
    summary["stages_s"] = stages
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _environment(worker) -> dict:
    import flax
    import jax
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "jax": jax.__version__,
            "flax": flax.__version__, "megengine": worker.info.get("megengine"),
            "megengine_python": worker.info.get("python"), "numpy": np.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count()}


# --------------------------------------------------------------------------- terminal table

LABELS = {"torch": "PyTorch", "megengine": "MegEngine", "flax": "Flax",
          "artifact/onnx": "ONNX (onnxruntime)", "artifact/mge": "traced .mge",
          "artifact/stablehlo": "StableHLO (jax)"}


def format_table(summary: dict) -> str:
    res = summary["results"]
    rows = [("framework", "form", "test acc", "same pred", "max |dlogit|", "img/s")]
    for key, r in res.items():
        if key.startswith("artifact/"):
            name, form = LABELS[key], "deploy"
        else:
            fw, form = key.split("/")
            name = LABELS[fw]
        ips = r.get("images_per_s")
        rows.append((name, form, f"{r['accuracy']:.2%}", f"{r['same_predictions']}/{r['n']}",
                     "0 (ref)" if key == "torch/train" else f"{r['max_abs_logit_diff']:.1e}",
                     f"{ips:,.0f}" if ips else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    p = summary["params"]
    tp = summary["throughput"]
    speed = ", ".join(f"{LABELS[fw]} x{tp[fw]['deploy_over_train']:.2f}" for fw in tp)
    ok = summary["all_identical"]["all"]
    lines += ["",
              f"parameters: {p['train']:,} (train) -> {p['deploy']:,} (deploy); "
              f"deploy/train throughput: {speed}",
              ("identical predictions in every framework, form and artifact" if ok else
               "WARNING: some predictions differ from the trained PyTorch model"),
              f"wrote {summary['out']}/: {len(summary['checkpoints'])} checkpoints (checkpoints/), "
              f"3 deploy artifacts (deploy/), summary.json, summary.png; total {summary['seconds']:.1f} s"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", metavar="DIR",
                        help="output directory (default ./demo-out; files in it are replaced)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, metavar="N",
                        help=f"training epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                        help=f"registry model (default {DEFAULT_MODEL}; 10 classes, 32x32 input)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S",
                        help="seed of the initialisation, batch order and augmentation "
                             "(the train/test split is fixed)")
    parser.add_argument("--no-train", action="store_true",
                        help="skip training: use the checkpoint shipped in assets/demo/")
    parser.add_argument("--quantize", nargs="?", const=QUANTIZE_MODELS, default=None,
                        metavar="MODEL,MODEL",
                        help="instead: train each model (default "
                             f"{QUANTIZE_MODELS}), quantize to int8 per channel and per tensor, "
                             "and compare accuracy and per-layer SQNR")
    parser.add_argument("--no-plot", action="store_true", help=argparse.SUPPRESS)
    # maintainers: refresh the shipped checkpoint (assets/demo/) from this run's training
    parser.add_argument("--save-asset", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.epochs < 1 and not args.no_train:
        raise ReparamError("--epochs must be at least 1 (or use --no-train)")
    if args.quantize:
        from .demo_quantize import compare, format_comparison, plot_comparison

        models = tuple(get_spec(m.strip(), NUM_CLASSES).name for m in args.quantize.split(","))
        results = compare(args.out, models, epochs=args.epochs, seed=args.seed)
        if not getattr(args, "no_plot", False):
            plot_comparison(results, str(Path(args.out) / "summary.png"))
        print(format_comparison(results))
        return 0
    summary = run_demo(out=args.out, epochs=args.epochs, model=args.model, seed=args.seed,
                       no_train=args.no_train, plot=not getattr(args, "no_plot", False),
                       save_asset=getattr(args, "save_asset", False))
    print(format_table(summary))
    if not summary["all_identical"]["all"]:  # exit 1 (scripts.cli), after the table
        raise VerificationError("some predictions differ from the trained PyTorch model (see the table)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`reparam demo ARGV...`, exit status included (scripts.cli)."""
    from scripts.cli import run_command

    return run_command("demo", argv)


if __name__ == "__main__":
    sys.exit(main())
