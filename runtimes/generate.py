"""Token generation over a DecoderSession, whichever provider runs it.

The loop is prefill (the whole prompt, empty past) then one step per new token, each step feeding the previous
step's present keys and values back as the next past (runtimes/contract.py names both). Where the cache lives
is the only provider-dependent part (runtimes/caches.py): `HostCache` for CPU graphs without
GroupQueryAttention, `SharedCache` (in place, the CPU's default for fused graphs; it takes a long prompt in
chunks of `PREFILL_CHUNK` tokens, so prefill's activations do not grow with the prompt), `BoundCache` (IO
binding, the cache on the GPU) and `StaticCache` (fixed buffers for CUDA graphs; `Generator(static=True)`, the
default under `cuda(graph=True)`).

Providers that cannot take a zero-length past (TensorRT, `spec.needs_nonempty_past`) prefill with one dummy
past slot of zeros that the attention mask hides; position ids still start at 0, so the tokens are the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes.caches import BoundCache, HostCache, SharedCache, StaticCache
from runtimes.errors import RuntimeUserError
from runtimes.providers import ProviderSpec
from runtimes.contract import ATTENTION_MASK, INPUT_IDS, LOGITS_TO_KEEP, POSITION_IDS
from runtimes.session import DecoderSession, open_session, resolve_model_path

TOKENIZER_FILE = "tokenizer.json"
ONE = np.array(1, np.int64)
PREFILL_CHUNK = 256  # prompt tokens per prefill run on the in-place cache (bounds prefill activations; 512
# held 13-27 MB more at a 1536-token prompt on SmolLM2 for no faster prefill, 128 was 5% slower on w4)
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled from the top-k / top-p set."""
    temperature: float = 0.0
    top_k: int = 0          # 0: no top-k cut
    top_p: float = 1.0      # 1.0: no nucleus cut

    def __post_init__(self):
        if self.temperature < 0:
            raise RuntimeUserError(f"temperature {self.temperature} is negative: use 0 for greedy or a value > 0")
        if self.top_k < 0:
            raise RuntimeUserError(f"top_k {self.top_k} is negative: use 0 to disable it or a count >= 1")
        if not 0 < self.top_p <= 1:
            raise RuntimeUserError(f"top_p {self.top_p} is outside (0, 1]: use 1.0 to disable it")


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one position's logits (vocab,)."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    candidates = np.arange(z.size)
    if 0 < sampling.top_k < z.size:
        candidates = np.argpartition(-z, sampling.top_k - 1)[:sampling.top_k]
    if sampling.top_p < 1:
        candidates = candidates[np.argsort(-z[candidates], kind="stable")]
    probs = np.exp(z[candidates] - z[candidates].max())
    cumulative = np.cumsum(probs)
    if sampling.top_p < 1:  # smallest prefix of the sorted candidates that holds top_p of the mass
        cumulative = cumulative[:np.searchsorted(cumulative, sampling.top_p * cumulative[-1]) + 1]
    pick = np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")
    return int(candidates[min(pick, cumulative.size - 1)])


class Generator:
    """Prefill / step / generate over one session; holds one sequence batch's KV cache at a time.

    `io_binding` None picks IO binding exactly when the provider's outputs live off the host (CUDA, TensorRT),
    and on the CPU the in-place cache for fused graphs; True / False force `BoundCache` / `HostCache`.
    """

    def __init__(self, session: DecoderSession, io_binding: bool | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 static: bool | None = None):
        self.session = session
        if prefill_chunk < 1:
            raise RuntimeUserError(f"prefill chunk of {prefill_chunk} tokens: give 1 or more")
        # `static`: the fixed-capacity cache on the device (`StaticCache`), which CUDA graphs need
        static = session.spec.graph_capture if static is None else static
        if static and not session.contract.fused_attention:
            raise RuntimeUserError(f"{session.path}: a fixed-capacity cache (as CUDA graphs need) takes a fused graph "
                                   f"(GroupQueryAttention): run `pipeline optimize` and use the fused variant")
        # the in-place cache takes a long prompt in chunks: GroupQueryAttention attends each chunk to the cache
        # written so far, so the logits are the same and prefill's activations scale with the chunk, not the prompt
        self._chunk = 1 << 62
        if static:
            self._cache = StaticCache(session)
        elif io_binding is None and session.spec.device == "cpu" and session.contract.fused_attention:
            self._cache = SharedCache(session)
            self._chunk = prefill_chunk
        else:
            use_binding = session.spec.device != "cpu" if io_binding is None else io_binding
            self._cache = BoundCache(session) if use_binding else HostCache(session)
        # a fused graph hands the past only to GroupQueryAttention (never a TensorRT subgraph), and that op
        # reads sequence lengths from the mask sum: a dummy slot there would shift them, so it gets none
        self._dummy = int(session.spec.needs_nonempty_past and not session.contract.fused_attention)
        self._feeds_mask = ATTENTION_MASK in session.input_names
        self._feeds_positions = POSITION_IDS in session.input_names
        # prefill: the last position's logits only, where the graph can (built graphs) and the cache feeds it
        self._keeps_last = LOGITS_TO_KEEP in session.input_names and not isinstance(self._cache, BoundCache)
        self._mask = np.ones((1, 0), np.int64)   # (batch, capacity): 0 at the dummy slot, 1 elsewhere
        self._total = 0                          # positions in the cache, dummy slot included
        self._next_position = 0                  # position id of the next token (the dummy slot has none)

    def prefill(self, ids: Sequence[int] | np.ndarray, capacity: int = 0) -> np.ndarray:
        """Run the prompt (S,) or (B, S) from an empty cache; returns the last position's logits (B, vocab).

        `capacity` is a hint of the final length, so the attention mask is allocated once.
        """
        ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
        batch, length = ids.shape
        check_request(self.session, length, max(capacity - length, 0))
        c = self.session.contract
        slots = max(capacity, length) + self._dummy
        self._cache.reset(np.zeros((batch, c.num_kv_heads, self._dummy, c.head_dim), self.session.kv_dtype), slots)
        self._mask = np.ones((batch, slots), np.int64)
        self._mask[:, :self._dummy] = 0
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
        # GroupQueryAttention takes more than one new token over a past only at batch 1: a batch prefills whole
        chunk = self._chunk if batch == 1 else length
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            self._total, self._next_position = self._dummy + stop, stop
            logits = self._forward(ids[:, start:stop], positions[:, start:stop], keep_last=self._keeps_last)
        return logits

    def step(self, tokens: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Append one token per sequence (after `prefill`); returns its logits (B, vocab)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        self._total += 1
        positions = np.full_like(ids, self._next_position)
        self._next_position += 1
        return self._forward(ids, positions)

    def _forward(self, ids: np.ndarray, positions: np.ndarray, keep_last: bool = False) -> np.ndarray:
        feeds = {INPUT_IDS: ids}
        if self._feeds_mask:
            feeds[ATTENTION_MASK] = self._mask_view()
        if self._feeds_positions:
            feeds[POSITION_IDS] = np.ascontiguousarray(positions)
        if keep_last:
            feeds[LOGITS_TO_KEEP] = ONE
        logits = self._cache.run(feeds)
        return logits[:, -1, :].astype(np.float32, copy=False)

    def _mask_view(self) -> np.ndarray:
        if self._total > self._mask.shape[1]:  # past the capacity hint: double, new slots attend
            grown = np.ones((self._mask.shape[0], 2 * self._total), np.int64)
            grown[:, :self._mask.shape[1]] = self._mask
            self._mask = grown
        return np.ascontiguousarray(self._mask[:, :self._total])

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Iterator[int]:
        """Yield up to `max_new_tokens` tokens after `prompt_ids`, calling `on_token` with each as it comes.

        Arguments are checked now; tokens are computed as the iterator is consumed. Generation stops before an
        end-of-sequence token, which is not yielded. The same seed gives the same tokens.
        """
        sampling = Sampling(temperature, top_k, top_p)
        check_request(self.session, len(prompt_ids), max_new_tokens)
        stops = frozenset([eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else eos_token_id or ())
        if seed is not None and seed < 0:
            raise RuntimeUserError(f"seed {seed} is negative: give 0 or more")
        return self._stream(prompt_ids, max_new_tokens, sampling, np.random.default_rng(seed), stops, on_token)

    def _stream(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling,
                rng: np.random.Generator, stops: frozenset[int],
                on_token: Callable[[int], None] | None) -> Iterator[int]:
        if max_new_tokens == 0:
            return
        logits = self.prefill(prompt_ids, capacity=len(prompt_ids) + max_new_tokens)[0]
        for produced in range(1, max_new_tokens + 1):
            token = choose(logits, sampling, rng)
            if token in stops:
                return
            if on_token is not None:
                on_token(token)
            yield token
            if produced < max_new_tokens:  # the last token's logits are never used: skip that run
                logits = self.step(token)[0]


def check_request(session: DecoderSession, prompt_len: int, max_new_tokens: int) -> None:
    """Reject an empty prompt or a request longer than the model's context before any work is done."""
    if prompt_len == 0:
        raise RuntimeUserError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise RuntimeUserError(f"max_new_tokens {max_new_tokens} is negative: ask for 0 or more tokens")
    limit = session.contract.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise RuntimeUserError(f"prompt ({prompt_len} tokens) + {max_new_tokens} new tokens exceeds the model's "
                               f"context of {limit}: shorten the prompt or ask for fewer tokens")


def greedy_tokens(session: DecoderSession, prompt_ids: Sequence[int], n: int) -> list[int]:
    """The `n` greedy continuation tokens of `prompt_ids` (no end-of-sequence stop)."""
    return list(Generator(session).generate(prompt_ids, n))


class TextStream:
    """Token ids in, text deltas out: holds back output while the tail is an incomplete UTF-8 sequence.

    Decoding each token alone breaks byte-level BPE (one character can span tokens) and loses the spaces that
    some decoders attach to the next token, so a short window ending at the new token is decoded instead.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0   # start of the window decoded for context
        self._read = 0     # end of what was already emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from tokenizer.json (imported here: only text generation needs it)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise RuntimeUserError(f"tokenizer {path} does not exist: put the model's {TOKENIZER_FILE} next to it "
                               "or pass its path")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for unreadable files
        raise RuntimeUserError(f"cannot read tokenizer {path} ({str(e).splitlines()[0]}): copy it again") from e


def default_eos(model_dir: Path) -> list[int]:
    """eos_token_id(s) from a Hugging Face generation_config.json next to the model, if there is one."""
    path = model_dir / GENERATION_CONFIG_FILE
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except ValueError as e:
        raise RuntimeUserError(f"{path} is not valid JSON ({e}): fix or delete it") from e
    return [eos] if isinstance(eos, int) else list(eos or [])


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; text that is not valid Unicode (bytes that are not UTF-8 reach Python's argv as
    lone surrogates) is refused with one line instead of the tokenizer's TypeError."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RuntimeUserError(f"the prompt is not valid UTF-8 text (byte {e.start} of it): pass UTF-8 text") from None
    return tokenizer.encode(prompt).ids


def text_generate(model: str | Path, tokenizer_path: str | Path | None, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                  spec: ProviderSpec | None = None, threads: int | None = None,
                  eos_token_id: int | Sequence[int] | None = None,
                  on_text: Callable[[str], None] | None = None) -> str:
    """Generate text after `prompt`; returns it and streams each new piece to `on_text`.

    `model` is a .onnx file or a bundle directory; `tokenizer_path` None means tokenizer.json beside the model,
    and `eos_token_id` None means the one in generation_config.json beside it (if any).
    """
    model_path = resolve_model_path(model)
    tokenizer = load_tokenizer(tokenizer_path or model_path.parent / TOKENIZER_FILE)
    prompt_ids = encode_prompt(tokenizer, prompt)
    session = open_session(model_path, spec, threads)
    stops = default_eos(model_path.parent) if eos_token_id is None else eos_token_id
    stream = TextStream(tokenizer)
    pieces = []
    for token in Generator(session).generate(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stops):
        piece = stream.push(token)
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
    return "".join(pieces)
