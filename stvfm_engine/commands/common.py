"""argparse types shared by the command groups."""
from __future__ import annotations

import argparse


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``, with an error that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
