"""Measure, not assert, which calibrators are translation-invariant and decision-preserving.

For each method: draw random parameters (a fitted calibrator is just one point of its family; the
identity initialisation would pass every check), random logits and images, and test in float64

- TI: softmax(g(z + c)) == softmax(g(z)) with a random shift c per pixel;
- argmax preservation: argmax g(z) == argmax z at every pixel;
- order preservation: the class ranking of g(z) equals that of z at every pixel.

A property holds only if it holds in every trial. The README's property table is this module's
output (`python -m trustseg.calibrators.properties`), and a test keeps the two equal.
"""

from __future__ import annotations

import torch

from trustseg.calibrators.methods import METHODS, Calibrator, build_calibrator

PROPERTIES = ("translation_invariant", "argmax_preserving", "order_preserving")
_TOLERANCE = 1e-9


def _randomize(calibrator: Calibrator, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in calibrator.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def measure_properties(method: str, *, num_classes: int = 6, trials: int = 5, seed: int = 0) -> dict[str, bool]:
    """{property: holds} for `method`, measured on random parameters, logits and images."""
    generator = torch.Generator().manual_seed(seed)
    holds = dict.fromkeys(PROPERTIES, True)
    for _ in range(trials):
        calibrator = build_calibrator(method, num_classes).double()
        _randomize(calibrator, generator)
        logits = 4 * torch.randn(2, num_classes, 9, 11, generator=generator, dtype=torch.float64)
        images = 255 * torch.rand(2, 3, 9, 11, generator=generator, dtype=torch.float64)
        shift = 10 * torch.randn(2, 1, 9, 11, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            calibrated = calibrator(logits, images)
            shifted = calibrator(logits + shift, images)
        gap = (calibrated.softmax(1) - shifted.softmax(1)).abs().max()
        holds["translation_invariant"] &= bool(gap < _TOLERANCE)
        holds["argmax_preserving"] &= torch.equal(calibrated.argmax(1), logits.argmax(1))
        holds["order_preserving"] &= torch.equal(calibrated.argsort(1), logits.argsort(1))
    return holds


def property_table() -> str:
    """The Markdown table of measured properties, one row per method."""
    mark = {True: "yes", False: "no"}
    lines = [
        "| Method | What | Translation-invariant | Argmax-preserving | Order-preserving | Fitted on |",
        "|---|---|---|---|---|---|",
    ]
    for method, (cls, options, description) in METHODS.items():
        measured = measure_properties(method)
        fitted_on = "logit-map crops + images" if cls.spatial else "pixel sample"
        cells = " | ".join(mark[measured[p]] for p in PROPERTIES)
        lines.append(f"| `{method}` | {description} | {cells} | {fitted_on} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(property_table())
