"""Key maps to and from upstream formats (the strict key checks every loader shares are core: :mod:`mmlm.hub`)."""

from mmlm.convert.keys import load_part, read_checkpoint, split_by_prefix, tied_aliases

__all__ = ["load_part", "read_checkpoint", "split_by_prefix", "tied_aliases"]
