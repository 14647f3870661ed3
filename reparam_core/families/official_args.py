"""Checks shared by the families' official constructors (their `OFFICIAL` entries): the
arguments every official class takes that the block description has no room for.

Each raises SpecError naming the class, the argument and the value, and saying why."""

from __future__ import annotations

from typing import Any, Literal

from ..errors import SpecError

ActName = Literal["relu", "silu", "identity"]  # the activations an official block may take
ACT_NAMES: tuple[ActName, ...] = ("relu", "silu", "identity")
# Activation modules (instances or classes) that a description's Act can stand for, by class name.
_ACT_CLASSES: dict[str, ActName] = {"ReLU": "relu", "SiLU": "silu", "Identity": "identity"}


def activation(cls: str, arg: str, value: Any) -> ActName:
    """The Act name of an activation argument: 'relu'/'silu'/'identity', or an nn.ReLU / nn.SiLU /
    nn.Identity instance or class (recognised by class name; no framework is imported)."""
    if isinstance(value, str):
        for act in ACT_NAMES:
            if value == act:
                return act
    else:
        name = value.__name__ if isinstance(value, type) else type(value).__name__
        if name in _ACT_CLASSES:
            return _ACT_CLASSES[name]
    raise SpecError(
        f"{cls}: {arg}={value!r} is not supported; accepted: "
        f"{', '.join(ACT_NAMES)} or an nn.ReLU / nn.SiLU / nn.Identity module"
    )


def train_form_only(cls: str, deploy: Any) -> None:
    """deploy=True is refused: a spec describes both forms; build_block(spec, deploy=True) builds
    the deploy form."""
    if deploy:
        raise SpecError(
            f"{cls}: deploy={deploy!r}: pass deploy=False (the spec describes both "
            "forms; build the deploy form with build_block(spec, deploy=True))"
        )


def zeros_padding(cls: str, padding_mode: Any) -> None:
    if padding_mode != "zeros":
        raise SpecError(
            f"{cls}: padding_mode={padding_mode!r} is not supported; only 'zeros' "
            "(the fused conv equals the branches with zero padding only)"
        )


def require(cls: str, ok: bool, arg: str, value: Any, why: str) -> None:
    """SpecError `cls: arg=value: why` unless ok."""
    if not ok:
        raise SpecError(f"{cls}: {arg}={value!r}: {why}")


def ints(cls: str, **values: object) -> None:
    """SpecError `cls name must be an int, got value` for the first value that is not an int
    (a bool is not)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(f"{cls} {name} must be an int, got {value!r}")


def bools(cls: str, **values: object) -> None:
    """SpecError `cls name must be a bool, got value` for the first value that is not a bool."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise SpecError(f"{cls} {name} must be a bool, got {value!r}")


def positive(cls: str, **values: int) -> None:
    for arg, v in values.items():
        require(cls, isinstance(v, int) and not isinstance(v, bool) and v >= 1, arg, v, "must be an int >= 1")


def grouped(cls: str, in_channels: int, out_channels: int, groups: int) -> None:
    require(
        cls,
        in_channels % groups == 0 and out_channels % groups == 0,
        "groups",
        groups,
        f"must divide in_channels={in_channels} and out_channels={out_channels}",
    )


def repvgg_geometry(
    cls: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    padding_mode: str,
    deploy: bool,
) -> None:
    """The checks every RepVGG-style official block shares: 3x3 with padding 1 (the official
    asserts), dilation 1 (the official train form ignores it, its deploy conv does not), channels
    divisible by groups, zero padding, train form."""
    positive(cls, in_channels=in_channels, out_channels=out_channels, stride=stride, groups=groups)
    require(cls, kernel_size == 3, "kernel_size", kernel_size, "the official block asserts 3")
    require(cls, padding == 1, "padding", padding, "the official block asserts 1")
    require(
        cls,
        dilation == 1,
        "dilation",
        dilation,
        "the official train form ignores it (its deploy conv does not): only 1 gives the same function in both forms",
    )
    grouped(cls, in_channels, out_channels, groups)
    zeros_padding(cls, padding_mode)
    train_form_only(cls, deploy)


__all__ = [
    "ACT_NAMES",
    "ActName",
    "activation",
    "grouped",
    "positive",
    "repvgg_geometry",
    "require",
    "train_form_only",
    "zeros_padding",
]
