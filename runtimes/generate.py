"""Token generation over a DecoderSession, whichever provider runs it.

The loop is prefill (the whole prompt, empty past) then one step per new token, each step feeding the previous
step's present keys and values back as the next past (runtimes/contract.py names both). Where the cache lives
is the only provider-dependent part:

* `HostCache` — plain `session.run`: presents come back as numpy arrays and go straight back in (CPU graphs
  without GroupQueryAttention, whose attention concatenates past and new keys into a new tensor anyway).
* `SharedCache` — CPU, fused graphs: one buffer of the whole capacity per past tensor, bound as both the past
  input and the present output, so GroupQueryAttention writes the new positions in place and a decode step
  copies no cache at all (onnxruntime-genai's `past_present_share_buffer`). The default there; it takes a long
  prompt in chunks of `PREFILL_CHUNK` tokens, so prefill's activations do not grow with the prompt.
* `BoundCache` — IO binding: presents are bound to the provider's device and rebound as the next step's past,
  so on CUDA the cache never leaves the GPU; only the logits of the new position are copied to the host.
* `StaticCache` — fused graphs on any device (`Generator(static=True)`; the default under `cuda(graph=True)`):
  `SharedCache`'s in-place buffers on the provider's device, and every decode step on the same token, mask and
  logits buffers with the same shapes, which CUDA graph capture needs (the mask spans the whole capacity).

Providers that cannot take a zero-length past (TensorRT, `spec.needs_nonempty_past`) prefill with one dummy
past slot of zeros that the attention mask hides; position ids still start at 0, so the tokens are the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as _ort_c  # OrtValueVector and OrtDevice: run_with_ortvaluevector's types

from runtimes.errors import RuntimeUserError
from runtimes.providers import ProviderSpec
from runtimes.contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS, past_names,
                               present_names)
from runtimes.session import DecoderSession, open_session, resolve_model_path

TOKENIZER_FILE = "tokenizer.json"
ONE = np.array(1, np.int64)
PREFILL_CHUNK = 256  # prompt tokens per prefill run on the in-place cache (bounds prefill activations; 512
# held 13-27 MB more at a 1536-token prompt on SmolLM2 for no faster prefill, 128 was 5% slower on w4)
_CPU = _ort_c.OrtDevice(_ort_c.OrtDevice.cpu(), _ort_c.OrtDevice.default_memory(), 0)
_vector = _ort_c.OrtValueVector
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


class HostCache:
    """KV cache as numpy arrays through `session.run`: presents are fed back as the next past, untouched."""

    def __init__(self, session: DecoderSession):
        self._run = session.ort.run
        self._past_names = past_names(session.contract.num_layers)
        self._outputs = [LOGITS, *present_names(session.contract.num_layers)]
        self._past: dict[str, np.ndarray] = {}

    def reset(self, past: np.ndarray, capacity: int) -> None:
        self._past = dict.fromkeys(self._past_names, past)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds.update(self._past)
        logits, *presents = self._run(self._outputs, feeds)
        self._past = dict(zip(self._past_names, presents))
        return logits


class _InPlaceCache:
    """What both in-place caches read from the session: the names of the cache's inputs and outputs, the
    vocabulary and the logits' dtype."""

    def __init__(self, session: DecoderSession):
        self._session = session.ort
        self._vocab = session.contract.vocab_size
        logits_type = next(o.type for o in session.ort.get_outputs() if o.name == LOGITS)
        self._logits_dtype = np.float16 if logits_type == "tensor(float16)" else np.float32
        self._input_names = past_names(session.contract.num_layers)
        self._output_names = [LOGITS, *present_names(session.contract.num_layers)]


class SharedCache(_InPlaceCache):
    """KV cache updated in place by GroupQueryAttention: past and present are one host buffer per tensor.

    GroupQueryAttention shares the buffer when its past and present pointers are equal: it writes the new
    positions' keys and values at the offsets the attention mask's sum gives and reads only those positions, so
    the buffer holds `capacity` positions from the start and the mask (length = positions so far) says how many
    are live. Every run, prefill chunks and decode steps alike, goes through `run_with_ortvaluevector` with the
    buffers as preallocated outputs: unlike IO binding it also feeds `logits_to_keep` (an initializer with a
    default, which IO binding cannot bind), so a prefill writes its keys and values straight into the buffers
    and returns one row of logits. No step copies the cache; past the capacity the buffers double (one copy).
    """

    def __init__(self, session: DecoderSession):
        super().__init__(session)
        self._buffers: list[np.ndarray] = []  # owners of the memory the cache's OrtValues wrap
        self._values: list = []
        self._devices = [_CPU] * len(self._output_names)
        self._options = ort.RunOptions()

    def reset(self, past: np.ndarray, capacity: int) -> None:
        batch, heads, _, head_dim = past.shape
        self._buffers, self._values = [], []  # the last sequence's cache goes before the next one is allocated
        self._wrap([np.zeros((batch, heads, max(capacity, 1), head_dim), past.dtype) for _ in self._input_names])

    def _wrap(self, buffers: list[np.ndarray]) -> None:
        self._buffers = buffers
        self._values = [ort.OrtValue.ortvalue_from_numpy(b)._ortvalue for b in buffers]  # no copy

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        total = feeds[ATTENTION_MASK].shape[1]
        capacity = self._buffers[0].shape[2]
        if total > capacity:
            grown = []
            for old in self._buffers:
                new = np.zeros((*old.shape[:2], 2 * total, old.shape[3]), old.dtype)
                new[:, :, :capacity] = old
                grown.append(new)
            self._wrap(grown)
        batch, length = feeds[INPUT_IDS].shape
        logits = np.empty((batch, 1 if LOGITS_TO_KEEP in feeds else length, self._vocab), self._logits_dtype)
        # the OrtValues only point at these arrays: they stay referenced here until the run is over (np.require,
        # not ascontiguousarray, which would make logits_to_keep's scalar 1-D)
        arrays = [np.require(array, requirements="C") for array in feeds.values()]
        inputs, outputs = _vector(), _vector()
        for array in arrays:
            inputs.push_back(ort.OrtValue.ortvalue_from_numpy(array)._ortvalue)
        outputs.push_back(ort.OrtValue.ortvalue_from_numpy(logits)._ortvalue)
        for value in self._values:
            inputs.push_back(value)
            outputs.push_back(value)
        self._session.run_with_ortvaluevector(self._options, [*feeds, *self._input_names], inputs,
                                              self._output_names, outputs, self._devices)
        return logits


GRAPH_ID = "gpu_graph_id"  # onnxruntime's run option: the CUDA graph a run captures or replays; -1: none


class StaticCache(_InPlaceCache):
    """A fixed-capacity KV cache on the provider's device, with decode steps on fixed buffers: what CUDA graph
    capture needs, since a replay reads and writes the addresses and shapes its graph was captured with.

    As in `SharedCache`, past and present are one buffer per tensor, which GroupQueryAttention fills in place. A
    decode step's token, attention mask and logits have buffers of their own, written in place: the mask spans
    the whole capacity (ones for the positions so far, zeros after) so its shape never changes, and
    GroupQueryAttention takes the sequence length from the mask's sum, not its width, attending to those
    positions only (the logits are `SharedCache`'s, bit for bit on the CPU). A prefill runs off the graph
    (`gpu_graph_id` -1) with its own shapes, writing the prompt's keys and values into the same buffers and
    returning the last position's logits. Past the capacity the buffers double (one copy) and the next step
    captures a new graph.
    """

    def __init__(self, session: DecoderSession):
        super().__init__(session)
        spec = session.spec
        self._where = (spec.device, spec.device_id)
        kind = _ort_c.OrtDevice.cpu() if spec.device == "cpu" else _ort_c.OrtDevice.cuda()
        self._device = _ort_c.OrtDevice(kind, _ort_c.OrtDevice.default_memory(), spec.device_id)
        self._graphs = spec.graph_capture
        self._graph_id = 0
        self._kv: list[ort.OrtValue] = []
        self._host: list[np.ndarray] = []  # on the CPU, the memory the cache's OrtValues wrap
        self._step: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}  # decode input -> (host staging, its value)
        self._logits: ort.OrtValue | None = None
        self._logits_host: np.ndarray | None = None
        self._options: dict[int, ort.RunOptions] = {}

    @property
    def capacity(self) -> int:
        return self._kv[0].shape()[2] if self._kv else 0

    def reset(self, past: np.ndarray, capacity: int) -> None:
        batch, heads, _, head_dim = past.shape
        self._kv, self._host = [], []  # the last sequence's cache goes before the next one is allocated
        self._allocate([np.zeros((batch, heads, max(capacity, 1), head_dim), past.dtype) for _ in self._input_names])

    def _allocate(self, buffers: list[np.ndarray]) -> None:
        """Device copies of `buffers` as the cache; new buffers are a new graph, and new step buffers."""
        on_cpu = self._where[0] == "cpu"
        self._host = buffers if on_cpu else []
        self._kv = [ort.OrtValue.ortvalue_from_numpy(b, *self._where) for b in buffers]  # the CPU: no copy
        self._step, self._logits = {}, None
        self._graph_id += 1

    def _grow(self, capacity: int) -> None:
        grown = []
        for value in self._kv:
            old = value.numpy()
            new = np.zeros((*old.shape[:2], capacity, old.shape[3]), old.dtype)
            new[:, :, :old.shape[2]] = old
            grown.append(new)
        self._kv = []
        self._allocate(grown)

    def _run_options(self, graph_id: int) -> ort.RunOptions:
        if graph_id not in self._options:
            options = ort.RunOptions()
            if self._graphs:
                options.add_run_config_entry(GRAPH_ID, str(graph_id))
            self._options[graph_id] = options
        return self._options[graph_id]

    def _run(self, graph_id: int, names: list[str], inputs: list, logits: ort.OrtValue, device) -> None:
        vin, vout = _vector(), _vector()
        for value in [*inputs, *self._kv]:
            vin.push_back(value._ortvalue)
        for value in [logits, *self._kv]:
            vout.push_back(value._ortvalue)
        self._session.run_with_ortvaluevector(self._run_options(graph_id), [*names, *self._input_names], vin,
                                              self._output_names, vout, [device] + [self._device] * len(self._kv))

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        total = feeds[ATTENTION_MASK].shape[1]
        if total > self.capacity:
            self._grow(2 * total)
        batch, length = feeds[INPUT_IDS].shape
        if length > 1 or LOGITS_TO_KEEP in feeds:  # a prefill: its own shapes, off the graph
            logits = np.empty((batch, 1 if LOGITS_TO_KEEP in feeds else length, self._vocab), self._logits_dtype)
            arrays = [np.require(a, requirements="C") for a in feeds.values()]  # alive until the run is over
            self._run(-1, list(feeds), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays],
                      ort.OrtValue.ortvalue_from_numpy(logits), _CPU)
            return logits
        if not self._step:  # the decode step's buffers, kept for every step until the cache is reallocated
            for name, array in feeds.items():
                host = np.zeros((batch, self.capacity) if name == ATTENTION_MASK else array.shape, array.dtype)
                self._step[name] = host, ort.OrtValue.ortvalue_from_numpy(host, *self._where)
            self._logits_host = np.zeros((batch, 1, self._vocab), self._logits_dtype)  # the CPU's: the value's memory
            self._logits = ort.OrtValue.ortvalue_from_numpy(self._logits_host, *self._where)
        for name, array in feeds.items():
            host, value = self._step[name]
            if name == ATTENTION_MASK:
                host[:, total:] = 0
                host[:, :total] = array
            else:
                host[...] = array
            if self._where[0] != "cpu":  # on the CPU the value wraps `host` itself
                value.update_inplace(host)
        self._run(self._graph_id, list(self._step), [v for _, v in self._step.values()], self._logits,
                  self._device)
        return np.array(self._logits.numpy())  # a copy: the buffer is the next step's


class BoundCache:
    """KV cache kept on the provider's device with IO binding; only logits come back to the host.

    Outputs are rebound before every run: a bound output that already holds last step's tensor would be
    reused as a preallocated buffer, and its shape is one position short.
    """

    def __init__(self, session: DecoderSession):
        self._session = session.ort
        self._binding = session.ort.io_binding()
        self._device, self._device_id = session.spec.device, session.spec.device_id
        self._past_names = past_names(session.contract.num_layers)
        self._outputs = [LOGITS, *present_names(session.contract.num_layers)]

    def reset(self, past: np.ndarray, capacity: int) -> None:
        """Bind the initial (empty or dummy) past from the host: onnxruntime copies it over once, at prefill,
        and no zero-sized buffer is ever allocated on the device."""
        for name in self._past_names:
            self._binding.bind_cpu_input(name, past)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = self._binding
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in self._outputs:
            binding.bind_output(name, self._device, self._device_id)
        self._session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        for name, value in zip(self._past_names, presents):
            binding.bind_ortvalue_input(name, value)
        return logits.numpy()


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
