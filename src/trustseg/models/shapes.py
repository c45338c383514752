"""Input-size contract shared by every model: H and W must be multiples of `size_divisor`.

The inference wrapper pads to the divisor; a direct call with another size gets the size to pad to.
"""

from __future__ import annotations


def padded_size(height: int, width: int, divisor: int) -> tuple[int, int]:
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def check_input_size(height: int, width: int, divisor: int, *, model: str) -> None:
    """Raise ``ValueError`` naming the padded size when ``height`` or ``width`` is not a multiple of ``divisor``."""
    if height % divisor or width % divisor:
        padded_h, padded_w = padded_size(height, width, divisor)
        raise ValueError(
            f"{model} needs input height and width divisible by {divisor}, got {height}x{width}; "
            f"pad the input to {padded_h}x{padded_w}"
        )
