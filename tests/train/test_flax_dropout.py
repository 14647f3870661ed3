"""The Flax trainer's dropout masks are a function of (seed, step), as in the torch and MegEngine
trainers (there `manual_seed(seed * 1_000_003 + step)`): a step draws the same masks whatever ran
before it, so a resumed run draws those of the uninterrupted one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from backends.flax import create_model
from backends.flax.blocks import DROPOUT
from backends.flax.train import reseed_dropout


def _mask(model) -> np.ndarray:
    return np.asarray(getattr(model, DROPOUT)(jnp.ones((4, 64)), 0.5))


def test_masks_depend_on_seed_and_step_only() -> None:
    model = create_model("repghostnet_0_5x", num_classes=10, rngs=nnx.Rngs(0))
    reseed_dropout(model, 7, 5)
    first = _mask(model)
    later = _mask(model)  # the stream advances within a step
    assert not np.array_equal(first, later)
    assert 0.3 < (first > 0).mean() < 0.7  # rate 0.5: about half kept
    _mask(model)
    reseed_dropout(model, 7, 5)  # same step again, after other draws: the same masks
    np.testing.assert_array_equal(_mask(model), first)
    np.testing.assert_array_equal(_mask(model), later)
    reseed_dropout(model, 7, 6)
    assert not np.array_equal(_mask(model), first)
    reseed_dropout(model, 8, 5)
    assert not np.array_equal(_mask(model), first)


def test_reseed_inside_jit_matches_eager() -> None:
    model = create_model("repghostnet_0_5x", num_classes=10, rngs=nnx.Rngs(0))

    @nnx.jit
    def draw(m, step):
        reseed_dropout(m, 7, step)
        return getattr(m, DROPOUT)(jnp.ones((4, 64)), 0.5)

    jitted = np.asarray(draw(model, jnp.uint32(5)))
    reseed_dropout(model, 7, 5)
    np.testing.assert_array_equal(jitted, _mask(model))


def test_a_model_without_dropout_is_left_as_it_is() -> None:
    model = create_model("RepVGG-mini", num_classes=10, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    reseed_dropout(model, 7, 5)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    assert not hasattr(model, DROPOUT)
