"""The `reparam demo` summary figure (matplotlib, Agg): accuracy and throughput per framework and
form, the training curve, and a grid of test digits with their predictions.

    python -m scripts.demo_plot demo-out/summary.json [out.png]   # redraw from a summary
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.gridspec import SubplotSpec

FRAMEWORKS = (("torch", "PyTorch"), ("megengine", "MegEngine"), ("flax", "Flax"))
ARTIFACTS = (("artifact/onnx", "ONNX"), ("artifact/mge", ".mge"), ("artifact/stablehlo", "StableHLO"))
TRAIN_C, DEPLOY_C, ART_C = "#8da0cb", "#fc8d62", "#e5a07a"
OK_C, BAD_C, GREY = "#1a9641", "#d7191c", "#555555"


def _fmt_int(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def _accuracy_panel(ax: Axes, s: dict[str, Any]) -> None:
    res = s["results"]
    width = 0.36
    xs, labels = [], []
    accs = [r["accuracy"] for r in res.values()]
    lo = max(0.0, min(accs) - 0.06)
    lo = np.floor(lo * 50) / 50  # a round lower bound (2% steps)
    for i, (fw, name) in enumerate(FRAMEWORKS):
        for j, (form, color) in enumerate((("train", TRAIN_C), ("deploy", DEPLOY_C))):
            r = res[f"{fw}/{form}"]
            x = i + (j - 0.5) * width
            ax.bar(
                x,
                r["accuracy"] - lo,
                width * 0.92,
                bottom=lo,
                color=color,
                edgecolor="white",
                label=form if i == 0 else None,
            )
            ax.text(x, r["accuracy"] + 0.002, f"{r['accuracy']:.2%}", ha="center", va="bottom", fontsize=8, rotation=90)
        xs.append(i)
        labels.append(name)
    # the deploy artifacts as a fourth group
    i = len(FRAMEWORKS)
    aw = 0.26
    for j, (key, name) in enumerate(ARTIFACTS):
        r = res[key]
        x = i + (j - 1) * aw
        ax.bar(
            x,
            r["accuracy"] - lo,
            aw * 0.92,
            bottom=lo,
            color=ART_C,
            hatch="//",
            edgecolor="white",
            label="deploy artifact" if j == 0 else None,
        )
        ax.text(x, r["accuracy"] + 0.002, f"{r['accuracy']:.2%}", ha="center", va="bottom", fontsize=8, rotation=90)
        ax.text(
            x, lo + 0.004, name, ha="center", va="bottom", fontsize=7.5, rotation=90, color="white", fontweight="bold"
        )
    xs.append(i)
    labels.append("artifacts")
    ax.set_xticks(xs, labels)
    ax.set_ylim(lo, 1.0 + (1.0 - lo) * 0.42)
    ax.set_yticks([t for t in np.arange(lo, 1.0001, 0.02)])
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_ylabel("test accuracy")
    n = next(iter(res.values()))["n"]
    all_same = all(r["identical"] for r in res.values())
    worst = max(r["max_abs_logit_diff"] for r in res.values())
    ax.set_title("Test accuracy", fontsize=12, fontweight="bold", loc="left")
    msg = (
        f"all {len(res)} agree on {n}/{n} test images\nmax |Δlogit| vs PyTorch train: {worst:.0e}"
        if all_same
        else "predictions differ: "
        + ", ".join(f"{k} {r['same_predictions']}/{n}" for k, r in res.items() if not r["identical"])
    )
    ax.text(
        0.98,
        0.985,
        msg,
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=8.5,
        color=OK_C if all_same else BAD_C,
        bbox=dict(boxstyle="round,pad=0.3", fc="white", ec=OK_C if all_same else BAD_C, lw=0.8),
    )
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=1)
    ax.spines[["top", "right"]].set_visible(False)


def _throughput_panel(ax: Axes, s: dict[str, Any]) -> None:
    tp = s["throughput"]
    width = 0.38
    top = max(max(t["train_images_per_s"], t["deploy_images_per_s"]) for t in tp.values())
    for i, (fw, _name) in enumerate(FRAMEWORKS):
        t = tp[fw]
        for j, (form, color) in enumerate((("train", TRAIN_C), ("deploy", DEPLOY_C))):
            v = t[f"{form}_images_per_s"]
            x = i + (j - 0.5) * width
            ax.bar(x, v, width * 0.92, color=color, edgecolor="white", label=form if i == 0 else None)
            ax.text(x, v + top * 0.01, _fmt_int(v), ha="center", va="bottom", fontsize=8.5)
        ratio = t["deploy_over_train"]
        ax.text(
            i,
            max(t["train_images_per_s"], t["deploy_images_per_s"]) + top * 0.09,
            f"×{ratio:.2f}",
            ha="center",
            va="bottom",
            fontsize=11,
            fontweight="bold",
            color=OK_C if ratio >= 1 else BAD_C,
        )
    ax.set_xticks(range(len(FRAMEWORKS)), [n for _, n in FRAMEWORKS])
    ax.set_ylim(0, top * 1.3)
    ax.yaxis.set_major_formatter(lambda v, _: _fmt_int(v))
    ax.set_ylabel("images / s (CPU)")
    batch = next(iter(tp.values()))["batch"]
    reps = next(iter(tp.values()))["repeats"]
    ax.set_title("Inference throughput", fontsize=12, fontweight="bold", loc="left")
    ax.text(
        0.0,
        -0.12,
        f"batch {batch}, median of {reps} interleaved rounds; ×: deploy speed-up (median per-round ratio)",
        transform=ax.transAxes,
        fontsize=8,
        color=GREY,
    )
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def _training_panel(ax: Axes, s: dict[str, Any]) -> None:
    hist = s["training"].get("history") or []
    ax.set_title("Training (PyTorch, train form)", fontsize=12, fontweight="bold", loc="left")
    ax.spines[["top"]].set_visible(False)
    if not hist:
        src = s["training"].get("loaded_from", "a checkpoint")
        ax.text(
            0.5,
            0.5,
            f"not trained in this run\n(loaded {src})",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=10,
            color=GREY,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ep = [h["epoch"] for h in hist]
    ax.plot(ep, [h["loss"] for h in hist], "o-", color=TRAIN_C, lw=2, ms=4, label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy", color=TRAIN_C)
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(ep, [h["test_acc"] for h in hist], "s-", color=OK_C, lw=2, ms=4, label="test accuracy")
    ax2.set_ylim(np.floor((min(h["test_acc"] for h in hist) - 0.02) * 20) / 20, 1.005)
    ax2.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax2.set_ylabel("accuracy", color=OK_C)
    ax2.spines[["top"]].set_visible(False)
    last = hist[-1]
    ax2.annotate(
        f"{last['test_acc']:.1%}",
        (ep[-1], last["test_acc"]),
        xytext=(-6, -16),
        textcoords="offset points",
        ha="right",
        fontsize=9,
        color=OK_C,
        fontweight="bold",
    )
    if len(ep) <= 20:
        ax.set_xticks(ep)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8, frameon=False)
    info = s["training"]
    ax.text(
        0.0,
        -0.19,
        f"{info.get('optimizer', '')} lr {info.get('lr', '')}, batch "
        f"{info.get('batch_size', '')}, seed {info.get('seed', '')}, "
        f"{info.get('seconds', 0):.1f} s",
        transform=ax.transAxes,
        fontsize=8,
        color=GREY,
    )


def _gallery(fig: Figure, gs: SubplotSpec, s: dict[str, Any], images: np.ndarray | None) -> None:
    g = s["gallery"]
    n = len(g["labels"])
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    sub = gs.subgridspec(rows, cols, wspace=0.08, hspace=0.42)
    if images is None:
        from sklearn.datasets import load_digits

        all_images = load_digits().images
        imgs = [all_images[i] for i in g["dataset_indices"]]
    else:
        imgs = [images[i] for i in g["test_positions"]]
    preds = g["predictions"]
    for k in range(n):
        ax = fig.add_subplot(sub[k // cols, k % cols])
        label = g["labels"][k]
        ref = preds["torch/train"][k]
        ok = ref == label
        ax.imshow(imgs[k], cmap="gray_r", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_color(OK_C if ok else BAD_C)
            sp.set_linewidth(2.5 if ok else 3.5)
        agree = g["all_agree"][k]
        ax.set_title(
            f"pred {ref}" + ("" if ok else f" (true {label})"),
            fontsize=10,
            color=OK_C if ok else BAD_C,
            fontweight="bold",
            pad=3,
        )
        ax.set_xlabel(
            f"{len(preds)}/{len(preds)} agree"
            if agree
            else "disagree: " + "/".join(sorted({str(p[k]) for p in preds.values()})),
            fontsize=8.5,
            color=GREY if agree else BAD_C,
            labelpad=2,
        )


def plot_summary(summary: dict[str, Any], path: str | os.PathLike[str], images: np.ndarray | None = None) -> str:
    """Draw the summary figure to `path` (PNG). `images`: the raw 8x8 test images indexed by test
    position (else they are reloaded from sklearn by dataset index). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = summary
    fig = plt.figure(figsize=(16, 10), dpi=100)
    outer = fig.add_gridspec(2, 1, height_ratios=[1.0, 0.9], hspace=0.42, left=0.05, right=0.94, top=0.87, bottom=0.04)
    top = outer[0].subgridspec(1, 3, width_ratios=[1.35, 1.0, 1.0], wspace=0.3)
    _accuracy_panel(fig.add_subplot(top[0]), s)
    _throughput_panel(fig.add_subplot(top[1]), s)
    _training_panel(fig.add_subplot(top[2]), s)
    _gallery(fig, outer[1], s, images)

    p = s["params"]
    n = next(iter(s["results"].values()))["n"]
    ref_acc = s["results"]["torch/train"]["accuracy"]
    fig.suptitle(
        f"{s['model']} on scikit-learn digits: trained in PyTorch, re-parameterized, "
        f"run in PyTorch, MegEngine and Flax",
        fontsize=15,
        fontweight="bold",
        x=0.05,
        ha="left",
        y=0.975,
    )
    ok = s["all_identical"]["all"]
    fig.text(
        0.05,
        0.925,
        f"test accuracy {ref_acc:.2%} on {n} held-out digits  •  parameters "
        f"{p['train']:,} (multi-branch) → {p['deploy']:,} (one 3x3 conv per block)  •  "
        + ("identical predictions everywhere" if ok else "PREDICTIONS DIFFER"),
        fontsize=11,
        color=OK_C if ok else BAD_C,
        ha="left",
    )
    gallery_top = outer[1].get_position(fig).y1
    fig.text(
        0.05,
        gallery_top + 0.04,
        "Test digits (8x8 originals) with the prediction of the "
        "trained model; the count says how many of the 6 models and 3 artifacts agree",
        fontsize=11,
        fontweight="bold",
        ha="left",
    )
    fig.savefig(path, dpi=100, facecolor="white")
    plt.close(fig)
    return os.fspath(path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m scripts.demo_plot SUMMARY.json [OUT.png]", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        summary = json.load(f)
    out = argv[1] if len(argv) > 1 else os.fspath(Path(argv[0]).with_name("summary.png"))
    print(plot_summary(summary, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
