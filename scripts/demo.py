"""`reparam demo`: train a multi-branch RepVGG on handwritten digits, re-parameterize it and port
both forms to MegEngine and Flax, with proof that the predictions did not change.

    reparam demo [--out DIR] [--epochs N] [--model NAME] [--seed S] [--no-train]

Data: scikit-learn's bundled digits as `reparam train` reads them (reparam_core.training.digits: 1,797
8x8 images, bilinear to 32x32, gray repeated to 3 channels, normalised with the training split's
mean/std; the fixed stratified 80/20 split, independent of --seed, so the shipped checkpoint is
always scored on images it never saw). --seed sets the initialisation, the sample order and the
augmentation.

Stages: 1. train in PyTorch with `reparam train`'s trainer in this process (scripts/demo_train.py:
SGD with Nesterov momentum, cosine schedule with warm-up, label smoothing, random resized crops);
2. re-parameterize (accuracy, identical predictions, parameters, interleaved throughput); 3. port
through the neutral state to MegEngine (the worker in .venv-mge) and Flax, each of which
re-parameterizes on its own; 4. write checkpoints in every format and form, the deploy artifacts
(ONNX, traced .mge, StableHLO), summary.json and summary.png; 5. print a table.

Everything is compared with the trained PyTorch model (train form): "same" counts test images
whose predicted class is identical, "max |dlogit|" is the largest absolute logit difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from reparam_core import ReparamError, count_params, get_spec
from reparam_core.bench.timing import interleaved_throughput, paired_ratio, summarize
from reparam_core.demo.agreement import gallery, max_state_diff
from reparam_core.demo.checkpoint_set import write_every_format
from reparam_core.errors import VerificationError
from reparam_core.training.digits import load_digits_split

from . import demo_report as report
from . import demo_train
from .demo_train import NUM_CLASSES, load_asset, train_model

DEFAULT_MODEL = "RepVGG-mini"
QUANTIZE_MODELS = "RepVGG-mini,QARepVGG-mini"  # `--quantize`: two models of the same size
DEFAULT_EPOCHS = 10
DEFAULT_SEED = 0
TIMING_REPEATS = 9  # interleaved throughput measurement: median of this many rounds
GALLERY_SIZE = 16


def run_demo(
    *,
    out: str | os.PathLike[str] = "demo-out",
    epochs: int = DEFAULT_EPOCHS,
    model: str = DEFAULT_MODEL,
    seed: int = DEFAULT_SEED,
    no_train: bool = False,
    plot: bool = True,
    quiet: bool = False,
    save_asset: bool = False,
) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to OUT/summary.json)."""
    import torch

    from backends import flax as bf
    from backends import torch as bt
    from backends.megengine.remote import shared
    from backends.onnx import run_onnx

    t_start = t = time.perf_counter()
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
    data = load_digits_split()
    x_test, y_test, n = data.x_test, data.y_test, len(data.y_test)
    shape = (1, *data.x_test.shape[1:])
    t = mark("data", t)

    # 1. train (or load the shipped checkpoint)
    if no_train:
        torch_train, history, train_info = load_asset(model)
        train_info["seed"] = seed
        say(f"loaded the trained {model} from {train_info['loaded_from']} (--no-train)")
    else:
        say(f"training {model} on {len(data.y_train)} digits for {epochs} epochs (seed {seed}, reparam train)")
        torch_train, history, train_info = train_model(
            model, data, out_dir / "train", epochs=epochs, seed=seed, quiet=quiet
        )
        if save_asset:
            path = demo_train.save_asset(model, torch_train, data, history, train_info)
            say(f"saved the trained checkpoint to {path}")
    t = mark("train", t)
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no folder behind
    art_dir.mkdir(parents=True, exist_ok=True)

    # 2. re-parameterize in PyTorch
    torch_deploy = bt.reparameterize(torch_train).eval()
    state_train, state_deploy = bt.export_state(torch_train), bt.export_state(torch_deploy)
    logits = {"torch/train": bt.predict(torch_train, x_test), "torch/deploy": bt.predict(torch_deploy, x_test)}
    with torch.inference_mode():
        xt = torch.from_numpy(x_test)
        throughput: dict[str, dict[str, Any]] = {
            "torch": interleaved_throughput(
                {"train": lambda: torch_train(xt), "deploy": lambda: torch_deploy(xt)}, n, TIMING_REPEATS
            )
        }
    t = mark("reparameterize (torch)", t)

    # 3a. MegEngine through the worker: the torch train state, re-parameterized there, and
    # torch's deploy state loaded directly; the traced artifact; interleaved timing
    say("porting to MegEngine (worker in .venv-mge)")
    worker = shared()
    kw: dict[str, Any] = {"model": model, "num_classes": NUM_CLASSES}
    logits["megengine/train"] = worker.predict(form="train", state=state_train, x=x_test, **kw)
    logits["megengine/deploy"], mge_deploy_state = worker.predict(
        form="train", state=state_train, x=x_test, reparameterize=True, return_state=True, **kw
    )
    loaded = {"megengine/loaded": worker.predict(form="deploy", state=state_deploy, x=x_test, **kw)}
    mge_art = art_dir / f"{model}.mge"
    y_mge_art_first = worker.export_traced(form="deploy", state=state_deploy, artifact=mge_art, x=x_test[:1], **kw)
    y_mge_art = worker.run_traced(mge_art, x_test)
    times = worker.time_forms(state=state_train, x=x_test, repeats=TIMING_REPEATS, **kw)
    throughput["megengine"] = {
        **summarize(times, n),
        "deploy_over_train": paired_ratio(times["train"], times["deploy"]),
    }
    t = mark("port: megengine", t)

    # 3b. Flax
    say("porting to Flax")
    flax_train = bf.load_state(bf.empty_model(model, num_classes=NUM_CLASSES), state_train)
    flax_deploy = bf.reparameterize(flax_train)
    logits["flax/train"], logits["flax/deploy"] = bf.predict(flax_train, x_test), bf.predict(flax_deploy, x_test)
    loaded["flax/loaded"] = bf.predict(
        bf.load_state(bf.empty_model(model, num_classes=NUM_CLASSES, deploy=True), state_deploy), x_test
    )
    throughput["flax"] = interleaved_throughput(
        {"train": lambda: bf.predict(flax_train, x_test), "deploy": lambda: bf.predict(flax_deploy, x_test)},
        n,
        TIMING_REPEATS,
    )
    t = mark("port: flax", t)

    # 4. files: checkpoints and deploy artifacts (ONNX and StableHLO take one image per call)
    say(f"writing checkpoints and deploy artifacts to {out_dir}")
    checkpoints = write_every_format(spec, {"train": state_train, "deploy": state_deploy}, ckpt_dir)
    onnx_path = bt.export_onnx(torch_train, art_dir / f"{model}.onnx", input_shape=shape)
    shlo_path = bf.export_stablehlo(flax_train, art_dir / f"{model}.stablehlo", input_shape=shape)
    logits["artifact/onnx"] = run_onnx(onnx_path, x_test, batch=1)[0]
    logits["artifact/mge"] = y_mge_art
    shlo = bf.load_stablehlo(shlo_path)
    logits["artifact/stablehlo"] = np.concatenate([shlo(x_test[i : i + 1]) for i in range(n)])
    t = mark("write files", t)

    results = report.results(logits, y_test, throughput)
    porting: dict[str, Any] = report.porting({**logits, **loaded}, y_test)
    porting["mge_artifact_first_image_vs_torch_deploy"] = float(
        np.abs(y_mge_art_first - logits["torch/deploy"][:1]).max()
    )
    porting["fused_state_max_diff"] = {
        "megengine_vs_torch": max_state_diff(state_deploy, mge_deploy_state),
        "flax_vs_torch": max_state_diff(state_deploy, bf.export_state(flax_deploy)),
    }
    artifacts: dict[str, tuple[str | os.PathLike[str], str]] = {
        "onnx": (onnx_path, "onnxruntime"),
        "mge": (mge_art, "megengine GraphInference"),
        "stablehlo": (shlo_path, "jax.export"),
    }
    summary: dict[str, Any] = {
        "model": model,
        "out": os.fspath(out_dir),
        "command": f"reparam demo --out {out} --epochs {epochs} --model {model} --seed {seed}"
        + (" --no-train" if no_train else ""),
        "data": data.describe(),
        "training": {**train_info, "history": history},
        "params": {"train": count_params(spec, "train"), "deploy": count_params(spec, "deploy")},
        "reference": "torch/train (the trained PyTorch model); same_predictions and "
        "max_abs_logit_diff are measured against it on the test set",
        "results": results,
        "throughput": {fw: report.throughput_entry(tp, n, TIMING_REPEATS) for fw, tp in throughput.items()},
        "porting": porting,
        "all_identical": report.all_identical(results),
        "checkpoints": checkpoints,
        "artifacts": {
            k: {
                "path": os.fspath(p),
                "runtime": rt,
                **results[f"artifact/{k}"],
                **({"input": "data (NCHW, any batch)"} if k == "mge" else {"input_shape": list(shape)}),
            }
            for k, (p, rt) in artifacts.items()
        },
        "gallery": gallery(
            y_test,
            {k: v.argmax(1) for k, v in logits.items()},
            data.test_idx,
            reference=report.REFERENCE,
            k=GALLERY_SIZE,
        ),
        "environment": report.environment(worker.info),
    }
    if plot:
        from .demo_plot import plot_summary

        summary["figure"] = os.fspath(out_dir / "summary.png")
        plot_summary(summary, out_dir / "summary.png")
    mark("figure", t)
    summary["stages_s"] = stages
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="demo-out",
        metavar="DIR",
        help="output directory (default ./demo-out; files in it are replaced)",
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, metavar="N", help=f"training epochs (default {DEFAULT_EPOCHS})"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help=f"registry model (default {DEFAULT_MODEL}; 10 classes, 32x32 input)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        metavar="S",
        help="seed of the initialisation, sample order and augmentation (the train/test split is fixed)",
    )
    parser.add_argument(
        "--no-train", action="store_true", help="skip training: use the checkpoint shipped in assets/demo/"
    )
    parser.add_argument(
        "--quantize",
        nargs="?",
        const=QUANTIZE_MODELS,
        default=None,
        metavar="MODEL,MODEL",
        help="instead: train each model (default "
        f"{QUANTIZE_MODELS}), quantize to int8 per channel and per tensor, "
        "and compare accuracy and per-layer SQNR in ONNX Runtime and OpenVINO",
    )
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
    summary = run_demo(
        out=args.out,
        epochs=args.epochs,
        model=args.model,
        seed=args.seed,
        no_train=args.no_train,
        plot=not getattr(args, "no_plot", False),
        save_asset=getattr(args, "save_asset", False),
    )
    print(report.format_table(summary))
    if not summary["all_identical"]["all"]:  # exit 1 (scripts.cli), after the table
        raise VerificationError("some predictions differ from the trained PyTorch model (see the table)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`reparam demo ARGV...`, exit status included (scripts.cli)."""
    from scripts.cli import run_command

    return run_command("demo", argv)


if __name__ == "__main__":
    sys.exit(main())
