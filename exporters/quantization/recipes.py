"""Recipes as data: each is a list of passes, each pass's config built from the QuantConfig; a builder that
returns None leaves its pass out (e.g. `rotate=False`). `RECIPES[name]` is all `quantize` looks up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from exporters.acceptance import Thresholds
from exporters.quantization import passes as p
from exporters.quantization.config import QuantConfig
from exporters.quantization.grid import GridConfig, run_write_grid
from exporters.quantization.nbits import NBitsConfig
from exporters.quantization.qdq import QdqConfig
from exporters.quantization.smooth import SmoothConfig


@dataclass(frozen=True)
class Step:
    name: str                                      # the pass, as the report and tests call it
    run: Callable[[p.Quantizing, object], p.Quantizing]  # run(handle, config) -> handle
    config: Callable[[QuantConfig], object | None]  # the pass's config for this QuantConfig; None: skipped


def _calibrate(c: QuantConfig) -> p.CalibrateConfig:
    return p.CalibrateConfig(c.recipe, c.plan, c.calibrate_method, c.per_channel, c.reduce_range,
                             c.fallback if c.recipe == "w8a8" else None)


def _qdq(c: QuantConfig) -> QdqConfig:
    return QdqConfig(c.calibrate_method, c.per_channel, c.reduce_range, c.quantizes_embeddings, c.fallback,
                     c.block_size, c.accuracy_level, c.exclude, searched=c.search)


def _nbits(bits: int) -> Callable[[QuantConfig], p.WriteNBitsConfig]:
    return lambda c: p.WriteNBitsConfig(bits, NBitsConfig(c.block_size, c.accuracy_level, c.exclude, c.zero_points),
                                        c.head_bits,
                                        c.block_size if c.quantizes_embeddings else None,
                                        keep_float=bits == 4 and c.search, high_bits=c.w4_high_bits)


def _blockwise_gptq(bits: int) -> Callable[[QuantConfig], p.BlockwiseGptqConfig | None]:
    return lambda c: (p.BlockwiseGptqConfig(c.plan, c.block_size, bits, c.head_bits, bits == 4 and c.search,
                                            c.zero_points, c.w4_high_bits)
                      if c.weight_rounding == "gptq" else None)


def _measure_only(c: QuantConfig) -> p.SearchConfig:
    """Perplexity before and after; nothing is judged, so nothing is searched."""
    return p.SearchConfig(Thresholds(), 0.0, c.sensitivity_tokens, "", "", "", "")


def _w8a8_search(c: QuantConfig) -> p.SearchConfig:
    if not c.search:
        return _measure_only(c)
    how = "int8 weight-only fallback" if c.fallback == "w8" else "float"
    return p.SearchConfig(c.acceptance(c.max_ppl_increase), c.top1_z, c.sensitivity_tokens, "all_int8",
                          "sensitivity", how, "int8")


def _w4_search(c: QuantConfig) -> p.SearchConfig:
    if not c.search:
        return _measure_only(c)
    return p.SearchConfig(c.acceptance(c.w4_max_ppl_increase), c.top1_z, c.sensitivity_tokens, "ppl_all_4bit",
                          "w4_search", f"{c.w4_high_bits} bits", "4 bits")


STATIC_WRITE = (Step("targets", p.choose_static_targets, lambda c: p.TargetsConfig()),)

RECIPES: dict[str, tuple[Step, ...]] = {
    "static": (Step("calibrate", p.calibrate, _calibrate),
               *STATIC_WRITE,
               Step("write_qdq", p.run_write_qdq, _qdq),
               Step("measure", p.run_search, _measure_only)),
    "w8a8": (Step("calibrate", p.calibrate, _calibrate),
             Step("rotate", p.run_rotate, lambda c: p.RotateConfig() if c.rotates else None),
             Step("smooth", p.run_smooth,
                  lambda c: SmoothConfig(c.alpha, c.outlier_channels, c.weight_levels,
                                         c.online_hadamard if c.rotates else 0, c.exclude)),
             Step("online_hadamard", p.run_online_hadamard,
                  lambda c: p.OnlineHadamardConfig(c.online_hadamard) if c.rotates and c.online_hadamard else None),
             Step("pin_first_token", p.run_pin_first_token,
                  lambda c: p.PinConfig(c.first_token) if c.first_token is not None else None),
             *STATIC_WRITE,
             Step("ranges", p.run_ranges, lambda c: p.RangesConfig(c.calibrate_method)),
             Step("gptq", p.run_gptq, lambda c: p.GptqConfig(c.weight_levels, c.block_size if c.fallback == "w8"
                                                             and c.search else None)
                  if c.weight_rounding == "gptq" else None),
             Step("write_static", p.run_write_static, _qdq),
             Step("search", p.run_search, _w8a8_search)),
    "w8": (Step("gptq_blockwise", p.run_blockwise_gptq, _blockwise_gptq(8)),
           Step("write_nbits", p.run_write_nbits, _nbits(8)),
           Step("measure", p.run_search, _measure_only)),
    "gguf": (Step("write_grid", run_write_grid, lambda c: GridConfig(c.gguf, c.accuracy_level, c.block_size)),
             Step("measure", p.run_search, _measure_only)),
    "w4": (Step("rotate", p.run_rotate_weights,
                lambda c: p.RotateWeightsConfig(c.online_hadamard) if c.rotates else None),
           Step("gptq_blockwise", p.run_blockwise_gptq, _blockwise_gptq(4)),
           Step("write_nbits", p.run_write_nbits, _nbits(4)),
           Step("search", p.run_search, _w4_search)),
}


def steps(config: QuantConfig) -> list[tuple[Step, object]]:
    """The recipe's passes that run under `config`, each with its config."""
    return [(s, cfg) for s in RECIPES[config.recipe] if (cfg := s.config(config)) is not None]
