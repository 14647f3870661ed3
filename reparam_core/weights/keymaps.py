"""Key maps between the canonical (official PyTorch) names and other implementations' names, as
data, in both directions.

The schemes are those of SCHEMES: the official names (`canonical`) and the libraries that
implement some families. A family file exports `KEYMAPS: dict[scheme, Rules]`, one entry per
library that implements the family: an empty list where that library uses the official names (a
scheme that is the identity for a family is still that family's scheme). A rule is a pair of templates
`(foreign, canonical)`: literal text with placeholders `{i}` that match a decimal index; a
placeholder may be affine on either side (`{i+1}`, `{i*2+1}`). A template that starts with `^`
matches at the start of a key, any other at the start or right after a dot. Foreign -> canonical
applies the rules in order, left template to right; canonical -> foreign applies them in reverse
order, right to left, so one list of pairs is both maps (the round trip over every registry
model's schema is a test).

`to_canonical` tries the family's schemes (plus `canonical`, the identity) and keeps the one
that maps the most keys onto the model's schema; `from_canonical` writes a scheme's names.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np

from ..blocks.schema import FORMS, state_schema
from ..errors import CheckpointError, SpecError

Rule = tuple[str, str]
Rules = list[Rule]

# Every naming scheme of the ecosystem, `canonical` (the official PyTorch names) first.
SCHEMES = ("canonical", "basecls", "mmpretrain", "timm")

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_EXPR = re.compile(r"^([A-Za-z_]\w*)(?:\*(\d+))?(?:([+-])(\d+))?$")


@dataclass(frozen=True)
class _Affine:
    """n = a * var + b for a placeholder `{var*a+b}`."""

    var: str
    a: int
    b: int

    def solve(self, n: int) -> int | None:
        """var from n, or None when n is not a * var + b for an integer var >= 0."""
        q, r = divmod(n - self.b, self.a)
        return q if r == 0 and q >= 0 else None

    def render(self, value: int) -> str:
        return str(self.a * value + self.b)


def _affine(expr: str, template: str) -> _Affine:
    m = _EXPR.match(expr.replace(" ", ""))
    if m is None:
        raise SpecError(
            f"key-map template {template!r}: bad placeholder {{{expr}}}; expected "
            "{i}, {i+B}, {i-B}, {i*A} or {i*A+B}"
        )
    var, a, sign, b = m.groups()
    return _Affine(var, int(a or 1), (-1 if sign == "-" else 1) * int(b or 0))


@dataclass(frozen=True)
class _Template:
    pattern: re.Pattern[str]
    pieces: tuple[str | _Affine, ...]

    def render(self, values: Mapping[str, int]) -> str:
        return "".join(p if isinstance(p, str) else p.render(values[p.var]) for p in self.pieces)

    @property
    def slots(self) -> tuple[_Affine, ...]:
        return tuple(p for p in self.pieces if isinstance(p, _Affine))


@cache
def _compile(template: str) -> _Template:
    anchored = template.startswith("^")
    body = template[1:] if anchored else template
    pieces: list[str | _Affine] = []
    regex = "^" if anchored else r"(?<![^.])"
    pos = 0
    for m in _PLACEHOLDER.finditer(body):
        pieces.append(body[pos : m.start()])
        regex += re.escape(body[pos : m.start()]) + r"(\d+)"
        pieces.append(_affine(m.group(1), template))
        pos = m.end()
    pieces.append(body[pos:])
    regex += re.escape(body[pos:])
    return _Template(re.compile(regex), tuple(p for p in pieces if p != ""))


def _apply_rule(key: str, src: str, dst: str) -> str:
    s, d = _compile(src), _compile(dst)

    def replace(m: re.Match[str]) -> str:
        values: dict[str, int] = {}
        for slot, text in zip(s.slots, m.groups()):
            v = slot.solve(int(text))
            if v is None or values.setdefault(slot.var, v) != v:
                return m.group(0)
        if any(slot.var not in values for slot in d.slots):
            raise SpecError(
                f"key-map rule {src!r} -> {dst!r}: the right side uses an index the left side does not bind"
            )
        return d.render(values)

    return s.pattern.sub(replace, key)


def map_key(key: str, rules: Rules, *, reverse: bool = False) -> str:
    """A key under `rules`: foreign -> canonical, or canonical -> foreign with `reverse`."""
    if reverse:
        for foreign, canonical in reversed(rules):
            key = _apply_rule(key, canonical, foreign)
    else:
        for foreign, canonical in rules:
            key = _apply_rule(key, foreign, canonical)
    return key


def apply_scheme(state: Mapping[str, np.ndarray], rules: Rules, *, reverse: bool = False) -> dict[str, np.ndarray]:
    """Every key of `state` under `rules` (see map_key); values untouched."""
    return {map_key(k, rules, reverse=reverse): v for k, v in state.items()}


@dataclass(frozen=True)
class KeyNames:
    """How a source spells canonical keys, for error messages: a key the source holds as it is
    written there (`stem.conv_kxk.0.weight`, not the partly renamed `stage0.conv_kxk.0.weight`),
    any other key (one the source lacks) rendered in the source's scheme. Called with a
    canonical key; the mapping is built on the first call only (on the error path)."""

    keys: tuple[str, ...]
    rules: Rules

    @cached_property
    def _original(self) -> dict[str, str]:
        return {map_key(k, self.rules): k for k in self.keys}

    def __call__(self, key: str) -> str:
        original = self._original.get(key)
        return original if original is not None else map_key(key, self.rules, reverse=True)


def key_names(keys: Iterable[str], spec: object, scheme: str) -> KeyNames:
    """The spelling of `scheme` (a scheme of `spec`'s family, as returned by to_canonical) for a
    source holding `keys` (its keys before mapping): pass it to check_state as `names`."""
    return KeyNames(tuple(keys), schemes_for(spec)[scheme])


def schemes_for(spec: object) -> dict[str, Rules]:
    """The naming schemes of the family that defines `spec` (its family file's KEYMAPS), after
    `canonical` (no renaming). A KEYMAPS entry may be a function of the spec that returns its
    rules, where the names depend on the variant (FastViT's flat `network.{n}` list)."""
    family = importlib.import_module(type(spec).__module__)
    maps = getattr(family, "KEYMAPS", {})
    return {"canonical": [], **{scheme: rules(spec) if callable(rules) else rules for scheme, rules in maps.items()}}


def _known_keys(spec: object) -> set[str]:
    known: set[str] = set()
    for form in FORMS:
        known |= set(state_schema(spec, form))
    return known


def to_canonical(
    state: Mapping[str, np.ndarray], spec: object, source: str = "checkpoint"
) -> tuple[dict[str, np.ndarray], str]:
    """(state with canonical keys, scheme name). The scheme mapping the most keys onto the
    model's schema wins (ties go to the earlier scheme, `canonical` first). Unmapped keys are
    kept so that `check_state` can report them; CheckpointError when no scheme maps any key."""
    known = _known_keys(spec)
    schemes = schemes_for(spec)
    keys = [k for k in state if not k.endswith("num_batches_tracked")]
    best, best_score = "canonical", -1
    for name, rules in schemes.items():
        score = sum(map_key(k, rules) in known for k in keys)
        if score > best_score:
            best, best_score = name, score
    name_of = getattr(spec, "name", type(spec).__name__)
    if keys and best_score == 0:
        sample = ", ".join(keys[:5])
        raise CheckpointError(
            f"{source}: no key maps onto {name_of} under any known naming scheme "
            f"({', '.join(schemes)}); first unmapped keys: {sample}"
        )
    mapped = apply_scheme(state, schemes[best])
    if len(mapped) != len(state):
        raise CheckpointError(f"{source}: keys collide after mapping with the {best} scheme")
    return mapped, best


def from_canonical(state: Mapping[str, np.ndarray], spec: object, scheme: str) -> dict[str, np.ndarray]:
    """A canonical state under `scheme`'s names (e.g. 'timm', to hand a converted checkpoint
    back to timm). SpecError, naming the family's schemes, when the family has no such scheme: an
    unknown name, or a library of SCHEMES that does not implement the family."""
    schemes = schemes_for(spec)
    if scheme not in schemes:
        name_of = getattr(spec, "name", type(spec).__name__)
        why = f" ({scheme} does not implement this model's family)" if scheme in SCHEMES else ""
        raise SpecError(f"{name_of} has no {scheme!r} naming scheme{why}; known: {', '.join(schemes)}")
    return apply_scheme(state, schemes[scheme], reverse=True)


__all__ = [
    "SCHEMES",
    "Rule",
    "Rules",
    "map_key",
    "apply_scheme",
    "schemes_for",
    "to_canonical",
    "from_canonical",
    "KeyNames",
    "key_names",
]
