"""Argument types shared by the benchmark scripts (each imports this file from its own folder)."""

import argparse


def at_least(smallest: int):
    """argparse type: an integer of `smallest` or more."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < smallest:
            raise argparse.ArgumentTypeError(f"{text} is less than {smallest}")
        return value
    return parse


positive = at_least(1)  # counts: examples, repetitions, batch sizes
non_negative = at_least(0)  # where 0 means a default (torch threads, vocabulary)
