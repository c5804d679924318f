"""Stage `generate`: text from an ONNX variant through its KV cache, streamed as tokens come."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from models.errors import UserError
from pipeline.manifest import RunDir
from pipeline.validation import number, text

PREFERENCE = ("w8a8", "w4", "w8", "static", "fused", "fp32", "fused-fp16")  # fastest sound CPU variant first


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str
    variant: str = ""          # "" = the first available in PREFERENCE
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1.0 = off
    seed: int | None = None
    provider: str = "cpu"
    threads: int = 2

    def __post_init__(self):
        from runtimes.session import MAX_THREADS

        text("prompt", self.prompt)
        text("variant", self.variant)
        text("provider", self.provider)
        number("max_new_tokens", self.max_new_tokens, 0)
        number("temperature", self.temperature, 0, integer=False)
        number("top_k", self.top_k, 0)
        number("top_p", self.top_p, 0, 1, integer=False)
        if self.top_p == 0:
            raise UserError("top_p is 0: give a share in (0, 1]; 1.0 turns it off")
        number("seed", self.seed, 0, optional=True)
        number("threads", self.threads, 1, MAX_THREADS)


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
