"""Stepping a transformers model through its KV cache under the keyword this transformers uses
(models.hf.cache_keyword)."""

from __future__ import annotations

from models.hf import cache_keyword

KEY = cache_keyword()


def cache_of(output):
    """The cache a forward call returned."""
    return output[KEY]


def with_cache(cache) -> dict:
    """Keyword arguments that feed `cache` to the next forward call."""
    return {KEY: cache}
