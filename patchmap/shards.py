"""A run's examples: how many pairing found against how many the run asked for, and how they split into
shards of `shard_size`, one patch job each. The workflow plans its shards from the pairs file (the pairs
checkpoint), so this module reads only the file's example count, and imports neither xarray nor torch."""

import math

import netCDF4

SHORTFALL = "examples_shortfall"
"""The attribute of pairs.nc and divergence.nc that says a run found fewer pairs than it asked for."""


def shortfall(requested, found, facts):
    """One line when pairing found fewer pairs than the run asked for, else None."""
    if found < requested:
        return (f"asked for {requested:,} examples, found {found:,} pairs in {facts:,} facts; "
                f"the run uses those {found:,}")
    return None


def count(n_examples, shard_size):
    """How many shards `n_examples` pairs make: none is empty."""
    return math.ceil(n_examples / shard_size)


def bounds(n_examples, shard_size, shard):
    """The examples [start, stop) of shard number `shard`."""
    start = shard * shard_size
    return min(start, n_examples), min(start + shard_size, n_examples)


def example_count(pairs_path):
    """The number of pairs in a pairs file (its `example` dimension), read from the file's header."""
    with netCDF4.Dataset(pairs_path) as nc:
        return nc.dimensions["example"].size


def shards_of(pairs_path, shard_size):
    """The shard numbers of a pairs file: one per `shard_size` pairs it holds, the last one maybe fewer."""
    return range(count(example_count(pairs_path), shard_size))
