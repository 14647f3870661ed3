"""reparam_core.training without a framework (torch only as a reference for the resampling):
schedule, split, sample order over processes, augmentation draws, weight-decay rule, CLI
arguments of the torchrun workers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reparam_core import get_spec, state_schema
from reparam_core import training as tr


def test_learning_rate_warmup_then_cosine() -> None:
    sched = tr.Schedule(steps_per_epoch=10, total=100, warmup=10)
    assert tr.learning_rate(0.1, 0, sched) == pytest.approx(0.01)
    assert tr.learning_rate(0.1, 9, sched) == pytest.approx(0.1)
    assert tr.learning_rate(0.1, 10, sched) == pytest.approx(0.1)
    assert tr.learning_rate(0.1, 55, sched) == pytest.approx(0.05)  # half way through the cosine
    assert tr.learning_rate(0.1, 99, sched) == pytest.approx(0.05 * (1 + math.cos(math.pi * 89 / 90)))


def test_schedule_and_default_lr() -> None:
    cfg = tr.TrainConfig(model="RepVGG-mini", epochs=3, global_batch=16)
    sched = tr.make_schedule(cfg, 100)
    assert (sched.steps_per_epoch, sched.total, sched.warmup, sched.epochs) == (6, 18, 1, 3)
    assert cfg.base_lr == pytest.approx(0.1 * 16 / 256)
    capped = tr.make_schedule(tr.TrainConfig(model="m", epochs=10, global_batch=10, warmup_epochs=5), 200)
    assert (capped.total, capped.warmup) == (200, 20)  # 5 epochs = 100 steps, capped at 10%
    assert tr.make_schedule(tr.TrainConfig(model="m", max_steps=7, global_batch=10), 35).epochs == 3
    with pytest.raises(tr.TrainError, match="larger than the training split"):
        tr.make_schedule(tr.TrainConfig(model="m", global_batch=101), 100)


def test_stratified_split_is_fixed_and_disjoint() -> None:
    labels = np.repeat(np.arange(4), [10, 5, 2, 23])
    train, val = tr.stratified_split(labels)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [2, 1, 1, 5]  # round(0.2 n), at least 1
    again = tr.stratified_split(labels)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)


def test_rank_parts_tile_the_global_batch() -> None:
    order = tr.epoch_order(np.arange(100, 200), seed=3, epoch=2)
    assert sorted(order.tolist()) == list(range(100, 200))
    assert not np.array_equal(order, tr.epoch_order(np.arange(100, 200), seed=3, epoch=3))
    whole = tr.rank_indices(order, 4, 16, 0, 1)
    assert np.array_equal(whole, order[64:80])
    parts = [tr.rank_indices(order, 4, 16, r, 4) for r in range(4)]
    assert np.array_equal(np.concatenate(parts), whole)
    with pytest.raises(tr.TrainError, match="not divisible"):
        tr.rank_indices(order, 0, 10, 0, 4)


def test_crop_resize_matches_torch_bilinear() -> None:
    import torch
    import torch.nn.functional as F

    img = np.random.default_rng(0).random((8, 6, 3)).astype(np.float32)
    ours = tr.crop_resize(img, (0.0, 0.0, 8.0, 6.0), 20)
    ref = (
        F.interpolate(
            torch.from_numpy(img.transpose(2, 0, 1))[None], size=(20, 20), mode="bilinear", align_corners=False
        )[0]
        .numpy()
        .transpose(1, 2, 0)
    )
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    np.testing.assert_allclose(tr.crop_resize(img[:6], (0.0, 0.0, 6.0, 6.0), 6), img[:6], atol=1e-7)
    # a box: the top-left 4x4 quarter of a 8x8 ramp, resized to 4x4, is that quarter
    ramp = np.arange(64, dtype=np.float32).reshape(8, 8, 1)
    np.testing.assert_allclose(tr.crop_resize(ramp, (0.0, 0.0, 4.0, 4.0), 4), ramp[:4, :4], atol=1e-5)


def _toy(n: int = 12, size: int = 10) -> tr.Dataset:
    rng = np.random.default_rng(1)
    images = rng.random((n, size, size, 3)).astype(np.float32)
    labels = np.arange(n) % 3
    return tr.make_dataset(images, labels, ("a", "b", "c"), "toy")


def test_augmentation_depends_on_the_image_not_the_batch() -> None:
    data = _toy()
    xa, ya = tr.batch(data, np.array([3, 5, 7]), augment=True, flip=True, seed=0, epoch=1)
    xb, _ = tr.batch(data, np.array([7, 5]), augment=True, flip=True, seed=0, epoch=1)
    np.testing.assert_array_equal(xa[1], xb[1])
    np.testing.assert_array_equal(xa[2], xb[0])
    assert ya.tolist() == [0, 2, 1] and xa.shape == (3, 3, 10, 10)
    other_epoch, _ = tr.batch(data, np.array([3]), augment=True, flip=True, seed=0, epoch=2)
    assert not np.array_equal(other_epoch[0], xa[0])
    plain, _ = tr.batch(data, np.array([3]), augment=False, flip=True, seed=0, epoch=1)
    np.testing.assert_allclose(plain[0], ((data.images[3] - data.mean) / data.std).transpose(2, 0, 1), rtol=1e-6)
    # normalised with the training split's statistics
    xt, _ = tr.batch(data, data.train_idx, augment=False, flip=False, seed=0, epoch=0)
    np.testing.assert_allclose(xt.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(xt.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_weight_decay_rule_and_custom_l2_kernels() -> None:
    assert tr.custom_l2_kernels(get_spec("RepVGG-mini", 10)) == set()
    plus = get_spec("RepVGGplus-L2pse", 10)
    kernels = tr.custom_l2_kernels(plus)
    schema = state_schema(plus, "train")
    assert kernels and kernels <= set(schema)
    assert {k.rsplit(".", 3)[-3] for k in kernels} == {"rbr_dense", "rbr_1x1"}
    n_rep = sum(1 for k in schema if k.endswith("rbr_dense.conv.weight"))
    assert len(kernels) == 2 * n_rep
    decayed = tr.decayed_keys(plus)
    assert not decayed & kernels
    assert decayed == {k for k, t in schema.items() if t.kind in tr.DECAYED_KINDS} - kernels
    mini = tr.decayed_keys(get_spec("RepVGG-mini", 10))
    assert "stage1.0.rbr_dense.conv.weight" in mini and "stage1.0.rbr_dense.bn.weight" not in mini
    assert tr.has_aux_heads(plus) and not tr.has_aux_heads(get_spec("RepVGG-mini", 10))


def test_worker_arguments_round_trip() -> None:
    """The torchrun workers get exactly the parent's settings."""
    from scripts import cli
    from scripts.train import config, worker_argv

    args = cli.build_parser().parse_args(
        [
            "train",
            "--model",
            "RepVGG-mini",
            "--out",
            "o",
            "--max-steps",
            "7",
            "--global-batch",
            "32",
            "--lr",
            "0.05",
            "--wd",
            "3e-5",
            "--label-smoothing",
            "0.2",
            "--ema",
            "0.99",
            "--clip",
            "5",
            "--amp",
            "bf16",
            "--sync-bn",
            "--seed",
            "4",
            "--no-augment",
            "--nproc",
            "2",
        ]
    )
    cfg = config(args)
    again = config(cli.build_parser().parse_args(["train", *worker_argv(cfg, resume=True)]))
    assert again == cfg
    assert "--resume" in worker_argv(cfg, resume=True) and "--nproc" not in worker_argv(cfg, True)
