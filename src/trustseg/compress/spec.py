"""Compression specs as the CLI writes them: ``tome:r=8``, ``algm:tau=0.9``, ``cts:k=100``, ``prune:flops=0.5``,
``prune:flops=0.7+tome:r=4`` (prune-then-merge).

A spec is a chain of steps joined by ``+``; a step is a method name and ``key=value`` options joined
by ``,``. Structural pruning changes the weights, token reduction only how a forward pass runs, so a
chain prunes first and reduces tokens after, and holds at most one token-reduction step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trustseg.errors import UserError


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError("expected a fraction in (0, 1)")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _schedule(text: str) -> int | tuple[int, ...]:
    """``8`` (the same r in every block) or ``0/0/8/8`` (one r per block)."""
    values = tuple(_count(part) for part in text.split("/"))
    return values[0] if len(values) == 1 else values


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text
    return parse


def _flag(text: str) -> bool:
    return _choice("true", "false")(text.lower()) == "true"


def _similarity(text: str) -> float:
    value = float(text)
    if not -1 <= value <= 1:
        raise ValueError("expected a cosine similarity in [-1, 1]")
    return value


# method -> (kind, {option: parser}); the parsers raise ValueError with what they expected
METHODS: dict[str, tuple[str, dict[str, Callable[[str], Any]]]] = {
    "tome": ("tokens", {"r": _schedule, "inflect": float, "prop_attn": _flag}),
    "algm": ("tokens", {"tau": _similarity, "local": int, "global": int}),
    "cts": ("tokens", {"k": _count}),
    "prune": ("weights", {"flops": _ratio, "importance": _choice("taylor", "magnitude")}),
}
REQUIRED = {"tome": ("r",), "cts": ("k",), "prune": ("flops",)}


@dataclass(frozen=True)
class Step:
    method: str
    options: dict[str, Any]

    @property
    def kind(self) -> str:
        return METHODS[self.method][0]

    def __str__(self) -> str:
        return self.method + (":" + ",".join(f"{k}={_format(v)}" for k, v in self.options.items()) if self.options else "")


def _format(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_step(text: str, spec: str) -> Step:
    name, _, rest = text.strip().partition(":")
    if name not in METHODS:
        raise UserError(f"--method {spec!r}: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    parsers = METHODS[name][1]
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in parsers:
            raise UserError(f"--method {spec!r}: {name} takes {', '.join(f'{k}=...' for k in parsers)}, got {item!r}")
        try:
            options[key] = parsers[key](value)
        except ValueError as error:
            raise UserError(f"--method {spec!r}: {name} {key}={value!r}: {error}") from None
    missing = [key for key in REQUIRED.get(name, ()) if key not in options]
    if missing:
        raise UserError(f"--method {spec!r}: {name} needs {missing[0]}=..., e.g. {name}:{missing[0]}=...")
    return Step(name, options)


def parse_spec(spec: str) -> tuple[Step, ...]:
    """``prune:flops=0.7+tome:r=4`` -> (Step('prune', {'flops': 0.7}), Step('tome', {'r': 4}))."""
    steps = tuple(parse_step(part, spec) for part in spec.split("+"))
    kinds = [step.kind for step in steps]
    if kinds.count("tokens") > 1 or kinds.count("weights") > 1:
        raise UserError(f"--method {spec!r}: at most one pruning and one token-reduction step")
    if kinds != sorted(kinds, key=lambda kind: kind == "tokens"):
        raise UserError(f"--method {spec!r}: prune first, then reduce tokens (e.g. prune:flops=0.7+tome:r=4)")
    return steps


def spec_name(steps: tuple[Step, ...]) -> str:
    """The canonical text of a parsed spec (defaults not spelled out stay implicit)."""
    return "+".join(map(str, steps))


def family(steps: tuple[Step, ...]) -> str:
    """The curve a spec belongs to on a frontier plot: its method names, e.g. 'prune+tome'."""
    return "+".join(step.method for step in steps)
