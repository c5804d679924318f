"""Calibration feeds for static int8: prefill sequences and decode steps that carry a real KV cache.

A decoder runs in two regimes with different activation statistics: prefill (many tokens, empty past) and
decode (one token attending to a long past). Calibrating on prefill alone leaves the decode ranges to luck, so
every calibration window of `seq_len + num_decode_steps` tokens gives one prefill sample and then
`num_decode_steps` single-token samples whose past is the *real* present of the fp32 model, obtained by running
the model itself with onnxruntime — never zeros or noise, which would put attention in an unrealistic state.

Memory stays bounded: windows are token ids only, feeds are generated lazily one window at a time (one KV cache
alive at once), and `KVCacheCalibrationReader` supports ORT's strided calibration (`CalibStridedMinMax`), which
makes the calibrator fold its collected activations into ranges (or histograms) after every stride.

A `prefix` (the token every prompt opens with, that `quantize` pins: exporters/quantization/prefix.py) is run
at position 0 before each window and never sampled: the window's tokens then follow it as a prompt's do, and the
statistics hold only tokens the quantized MatMuls are kept for (the pinned token's keys and values are constants).

Tokenization happens in the caller: this module takes lists of token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from exporters import progress
from models.errors import UserError
from runtimes.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, Contract, past_key, past_value, present_key, \
    present_value, read_contract


@dataclass(frozen=True)
class CalibrationPlan:
    num_prefill: int       # windows cut from the calibration text; each gives one prefill sample
    seq_len: int           # tokens in each prefill sample
    num_decode_steps: int  # single-token samples after each prefill, each fed the real past KV
    prefix: tuple[int, ...] = ()  # run at position 0 before each window, never sampled; counted in seq_len

    def __post_init__(self):
        if self.num_prefill < 1 or self.seq_len <= len(self.prefix) or self.num_decode_steps < 0:
            raise UserError(f"calibration needs num_prefill >= 1, a prefill of at least 1 token after its prefix of "
                            f"{len(self.prefix)} and num_decode_steps >= 0 (got {self.num_prefill}, "
                            f"{self.seq_len - len(self.prefix)}, {self.num_decode_steps})")

    @property
    def window_len(self) -> int:
        """Positions a window spans, its prefix included."""
        return self.seq_len + self.num_decode_steps

    @property
    def cut_len(self) -> int:
        """Tokens each window takes from the text: every one is a sampled activation row."""
        return self.window_len - len(self.prefix)

    def windows(self, ids_list: Iterable[list[int]], vocab_size: int) -> np.ndarray:
        """The windows cut from `ids_list`, each text's opening prefix left out (`token_windows`)."""
        return token_windows(ids_list, self.cut_len, self.num_prefill, vocab_size, self.prefix)

    @property
    def samples_per_window(self) -> int:
        return 1 + self.num_decode_steps


def cpu_session(model_path: str | Path, prepack: bool = True) -> ort.InferenceSession:
    """A CPU session that logs only errors (ORT's warnings about unused initializers are noise here).

    `prepack=False`: onnxruntime keeps the float MatMul weights as loaded instead of making its packed copy, so
    weights in external data stay in its map of the file (pages the kernel can drop and read again) instead
    of a copy the size of the model: a Llama-3.2-1B probe session peaked at 9.5 GB while it was created with
    the copy. Its forwards are slower (SmolLM2-135M prefill of 128 tokens about 1.25x)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def session_contract(session: ort.InferenceSession) -> Contract:
    """The contract stored in the model's metadata, read from a session (no second load of the weights)."""
    return Contract.from_metadata(session.get_modelmeta().custom_metadata_map)


def token_windows(ids_list: Iterable[list[int]], window_len: int, count: int, vocab_size: int,
                  prefix: tuple[int, ...] = ()) -> np.ndarray:
    """Up to `count` non-overlapping windows of `window_len` ids, spread evenly over the concatenated text.

    Concatenating documents is what GPTQ/SmoothQuant calibration does too; spreading the windows (instead of
    taking the first `count`) keeps one long leading document from supplying every sample. A text that opens
    with `prefix` gives its tokens after it: the prefix belongs at position 0, where `window_feeds` puts it.
    """
    n = len(prefix)
    stream = np.fromiter((t for ids in ids_list for t in (ids[n:] if n and tuple(ids[:n]) == prefix else ids)),
                         dtype=np.int64)
    available = stream.size // window_len
    if available == 0:
        raise UserError(f"calibration text too short: {stream.size} tokens, one window needs {window_len} "
                        f"(seq_len + num_decode_steps): give more text or a smaller seq_len")
    if stream.min() < 0 or stream.max() >= vocab_size:
        raise UserError(f"calibration token ids must lie in [0, {vocab_size}) (the model's vocabulary), "
                        f"found {int(stream.min())}..{int(stream.max())}: was it tokenized with another tokenizer?")
    starts = np.unique(np.linspace(0, available - 1, min(count, available)).astype(np.int64)) * window_len
    return np.stack([stream[s:s + window_len] for s in starts])


def empty_past(contract: Contract) -> dict[str, np.ndarray]:
    dtype = np.float16 if contract.kv_dtype == "float16" else np.float32
    shape = (1, contract.num_kv_heads, 0, contract.head_dim)
    return {n: np.zeros(shape, dtype) for i in range(contract.num_layers) for n in (past_key(i), past_value(i))}


def step_feed(ids: np.ndarray, past_len: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All contract inputs for `ids` (batch 1) following `past_len` cached tokens."""
    seq = ids.size
    return {INPUT_IDS: ids.reshape(1, seq).astype(np.int64),
            ATTENTION_MASK: np.ones((1, past_len + seq), np.int64),
            POSITION_IDS: np.arange(past_len, past_len + seq, dtype=np.int64)[None],
            **past}


def declared(feed: dict[str, np.ndarray], names: set[str]) -> dict[str, np.ndarray]:
    """Only the inputs the model declares: a fused graph has no position_ids (GroupQueryAttention derives them)."""
    return {k: v for k, v in feed.items() if k in names}


def next_past(session: ort.InferenceSession, contract: Contract, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one step and return its present KV renamed as the next step's past."""
    outs = [n for i in range(contract.num_layers) for n in (present_key(i), present_value(i))]
    pasts = [n for i in range(contract.num_layers) for n in (past_key(i), past_value(i))]
    return dict(zip(pasts, session.run(outs, feed)))


def window_feeds(session: ort.InferenceSession, contract: Contract, window: np.ndarray,
                 plan: CalibrationPlan) -> Iterator[dict[str, np.ndarray]]:
    """The prefill feed of the window's first tokens, then one decode feed per remaining token with the real past;
    after the plan's prefix, run first at position 0 and not yielded.

    The model is only run when a further decode feed needs its present, and lazily, between yields.
    """
    names = {i.name for i in session.get_inputs()}
    start, past = len(plan.prefix), empty_past(contract)
    if start:
        past = next_past(session, contract, declared(step_feed(np.array(plan.prefix), 0, past), names))
    prefill = plan.seq_len - start
    feed = declared(step_feed(window[:prefill], start, past), names)
    yield feed
    for pos in range(prefill, window.size):
        past = next_past(session, contract, feed)
        feed = declared(step_feed(window[pos:pos + 1], start + pos, past), names)
        yield feed


class KVCacheCalibrationReader(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over prefill + decode feeds, produced lazily from token windows.

    `model_path` is the fp32 model whose presents become the decode steps' past, unless a pass brings the
    session of the graph it probes (`through`): a rewritten graph's cache need not be the source's (R2 rotates
    the value heads, exporters/rotation.py), and a past from the source would put the rewritten graph's
    attention in a state it never reaches. Implements `__len__` and `set_range` for quantize_static's
    strided calibration (`CalibStridedMinMax`): consecutive ranges continue one pass over the windows, so the
    model runs once per sample however small the stride.
    """

    def __init__(self, model_path: str | Path, ids_list: Iterable[list[int]], plan: CalibrationPlan):
        self.model_path = Path(model_path)
        self.contract = read_contract(onnx.load(str(model_path), load_external_data=False), self.model_path)
        self.plan = plan
        self.windows = plan.windows(ids_list, self.contract.vocab_size)
        self._session: ort.InferenceSession | None = None
        self._stream, self._next, self._stop = self.feeds(), 0, len(self)

    @property
    def session(self) -> ort.InferenceSession:
        """A session of the model the reader was made for, opened on first use: a caller that brings its own
        (`feeds(session=...)`) never holds a second copy of the weights."""
        if self._session is None:
            self._session = cpu_session(self.model_path)
        return self._session

    def __len__(self) -> int:
        return len(self.windows) * self.plan.samples_per_window

    def feeds(self, first_window: int = 0, stop_window: int | None = None,
              session: ort.InferenceSession | None = None) -> Iterator[dict[str, np.ndarray]]:
        """A fresh pass over the windows [first_window, stop_window), independent of get_next's position; the
        decode steps' past from `session` when given (the graph a pass probes, rotated or smoothed: its own
        cache), else from the reader's own."""
        windows = self.windows[first_window:stop_window]
        for window in progress.each(windows, "calibration pass", unit="window"):
            yield from window_feeds(session or self.session, self.contract, window, self.plan)

    def through(self, session: ort.InferenceSession) -> Iterator[dict[str, np.ndarray]]:
        """A pass over every window with the past from `session`."""
        return self.feeds(session=session)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._stop:
            return None
        self._next += 1
        return next(self._stream, None)

    def set_range(self, start_index: int, end_index: int) -> None:
        if start_index != self._next:  # not a continuation: restart at the window holding start_index
            per = self.plan.samples_per_window
            self._stream = self.feeds(start_index // per)
            for _ in range(start_index % per):
                next(self._stream)
            self._next = start_index
        self._stop = min(end_index, len(self))
