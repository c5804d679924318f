"""Stage `generate`: text from an ONNX variant through its KV cache, streamed as tokens come."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from models.errors import UserError
from pipeline import options
from pipeline.manifest import RunDir
from pipeline.options import check_options, option

PREFERENCE = ("w8a8", "w4", "w8", "static", "fused", "fp32", "fused-fp16")  # fastest sound CPU variant first


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str = option(str, dataclasses.MISSING, "Text to continue.")
    variant: str = option(str, "", "Variant to run (default: the best available).")
    max_new_tokens: int = option(int, 64, "Tokens to generate at most.", lo=0)
    temperature: float = option(float, 0.0, "Sampling temperature; 0 = greedy.", lo=0)
    top_k: int = option(int, 0, "Sample among the k likeliest tokens; 0 = off.", lo=0)
    top_p: float = option(float, 1.0, "Sample among the likeliest tokens whose probabilities add up to p; "
                          "1.0 = off.", lo=1e-12, hi=1)
    seed: int | None = option(int, None, "Sampling seed (reproducible output).", lo=0, optional=True)
    provider: str = options.provider()
    threads: int = options.threads()

    def __post_init__(self):
        check_options(self)


def pick_variant(run: RunDir, wanted: str) -> str:
    have = run.variants()
    if wanted:
        if wanted not in have:
            raise UserError(f"run {run.root} has no variant {wanted!r} (has: {', '.join(have) or 'none'})")
        return wanted
    for v in PREFERENCE:
        if v in have:
            return v
    raise UserError(f"run {run.root} has no ONNX variant: run `pipeline export` first")


def generate(run: RunDir, config: GenerateConfig, on_text: Callable[[str], None]) -> list[int]:
    from runtimes.generate import Generator, TextStream, encode_prompt, load_tokenizer
    from runtimes.providers import resolve
    from runtimes.session import open_session

    variant = pick_variant(run, config.variant)
    tok = load_tokenizer(run.root / "tokenizer.json")
    ids = encode_prompt(tok, config.prompt)
    sess = open_session(run.verified(variant), resolve(config.provider), threads=config.threads)
    if not ids:
        raise UserError("the prompt encodes to no tokens: give some text")
    stream = TextStream(tok)
    eos = run.artifact("source").get("eos_token_id")
    tokens = Generator(sess).generate(ids, config.max_new_tokens, temperature=config.temperature,
                                      top_k=config.top_k, top_p=config.top_p, seed=config.seed, eos_token_id=eos,
                                      on_token=lambda t: on_text(stream.push(t)))
    return list(tokens)
