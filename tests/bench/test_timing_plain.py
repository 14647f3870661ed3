"""The benchmark's building blocks: interleaved timing, paired ratios, the plain-stack spec."""

from __future__ import annotations

import pytest

from reparam_core import ReparamError, get_spec
from reparam_core.bench.plain import has_plain_reference, plain_layers
from reparam_core.bench.timing import interleaved_times, paired_ratio, summarize


def test_interleaved_order_warmup_and_counts() -> None:
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = interleaved_times(fns, repeats=3, warmup=2)
    assert calls == ["a", "b", "c"] * 5  # 2 warm-up rounds, then 3 timed, A B C A B C
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="repeats"):
        interleaved_times(fns, repeats=0)


def test_paired_ratio_is_median_of_round_ratios() -> None:
    # a burst that slows one whole round cancels out of the paired ratio
    assert paired_ratio([2.0, 20.0, 2.2], [1.0, 10.0, 1.0]) == pytest.approx(2.0)
    s = summarize({"x": [0.5, 0.25, 1.0]}, batch=8)["x"]
    assert s["median_s"] == 0.5 and s["images_per_s"] == 16.0 and s["runs_s"] == [0.5, 0.25, 1.0]


def test_plain_layers_follow_the_deploy_spec() -> None:
    spec = get_spec("RepVGG-B1g4")
    layers = plain_layers(spec)
    blocks = spec.blocks()
    assert [p.key for p in layers] == [f"{prefix}.rbr_reparam" for prefix, _ in blocks]
    assert [(p.stride, p.groups, p.padding) for p in layers] == [(b.stride, b.groups, b.padding) for _, b in blocks]
    assert {p.groups for p in layers} == {1, 4}
    assert layers[-1].out_channels == spec.num_features


@pytest.mark.parametrize(
    "name,why", [("repghostnet_1_0x", "only RepVGG"), ("RepVGG-D2se", "has SE"), ("RepVGGplus-L2pse", "only RepVGG")]
)
def test_no_plain_reference_says_why(name: str, why: str) -> None:
    assert not has_plain_reference(get_spec(name))
    with pytest.raises(ReparamError, match=why):
        plain_layers(get_spec(name))
