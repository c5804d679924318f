"""transformers' KV cache keyword: `cache` since 5.x (`past_key_values` still works there, with a deprecation
warning), `past_key_values` before. Tests that step a transformers model through its cache use these."""

from __future__ import annotations

import inspect

from transformers import LlamaForCausalLM

KEY = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_of(output):
    """The cache a forward call returned."""
    return output[KEY]


def with_cache(cache) -> dict:
    """Keyword arguments that feed `cache` to the next forward call."""
    return {KEY: cache}
