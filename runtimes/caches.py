"""Where a generation's KV cache lives (runtimes/generate.py `Generator` picks one):

* `HostCache` — plain `session.run`: presents come back as numpy arrays and go straight back in (CPU graphs
  without GroupQueryAttention, whose attention concatenates past and new keys into a new tensor anyway).
* `SharedCache` — CPU, fused graphs: one buffer of the whole capacity per past tensor, bound as both the past
  input and the present output, so GroupQueryAttention writes the new positions in place and a decode step
  copies no cache at all (onnxruntime-genai's `past_present_share_buffer`).
* `BoundCache` — IO binding: presents are bound to the provider's device and rebound as the next step's past,
  so on CUDA the cache never leaves the GPU; only the logits of the new position are copied to the host.
* `StaticCache` — fused graphs on any device: `SharedCache`'s in-place buffers on the provider's device, and
  every decode step on the same token, mask and logits buffers with the same shapes, which CUDA graph capture
  needs (the mask spans the whole capacity).

Each takes `reset(past, capacity)` before a sequence and `run(feeds) -> logits` per prefill chunk or step.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as _ort_c  # OrtValueVector and OrtDevice: run_with_ortvaluevector's types

from runtimes.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, past_names, present_names
from runtimes.session import DecoderSession

_CPU = _ort_c.OrtDevice(_ort_c.OrtDevice.cpu(), _ort_c.OrtDevice.default_memory(), 0)
_vector = _ort_c.OrtValueVector


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
        self._step_call: tuple | None = None  # the decode step's run_with_ortvaluevector arguments
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

    def _call(self, names: list[str], inputs: list, logits: ort.OrtValue, device) -> tuple:
        """run_with_ortvaluevector's arguments: these inputs then the cache in, the logits then the cache out."""
        vin, vout = _vector(), _vector()
        for value in [*inputs, *self._kv]:
            vin.push_back(value._ortvalue)
        for value in [logits, *self._kv]:
            vout.push_back(value._ortvalue)
        return [*names, *self._input_names], vin, vout, [device] + [self._device] * len(self._kv)

    def _execute(self, graph_id: int, call: tuple) -> None:
        names, vin, vout, devices = call
        self._session.run_with_ortvaluevector(self._run_options(graph_id), names, vin, self._output_names, vout,
                                              devices)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        total = feeds[ATTENTION_MASK].shape[1]
        if total > self.capacity:
            self._grow(2 * total)
        batch, length = feeds[INPUT_IDS].shape
        if length > 1 or LOGITS_TO_KEEP in feeds:  # a prefill: its own shapes, off the graph
            logits = np.empty((batch, 1 if LOGITS_TO_KEEP in feeds else length, self._vocab), self._logits_dtype)
            arrays = [np.require(a, requirements="C") for a in feeds.values()]  # alive until the run is over
            self._execute(-1, self._call(list(feeds), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays],
                                         ort.OrtValue.ortvalue_from_numpy(logits), _CPU))
            return logits
        if not self._step:  # the decode step's buffers and call, kept for every step until the cache is reallocated
            for name, array in feeds.items():
                host = np.zeros((batch, self.capacity) if name == ATTENTION_MASK else array.shape, array.dtype)
                self._step[name] = host, ort.OrtValue.ortvalue_from_numpy(host, *self._where)
            self._logits_host = np.zeros((batch, 1, self._vocab), self._logits_dtype)  # the CPU's: the value's memory
            self._logits = ort.OrtValue.ortvalue_from_numpy(self._logits_host, *self._where)
            self._step_call = self._call(list(self._step), [v for _, v in self._step.values()], self._logits,
                                         self._device)
        for name, array in feeds.items():
            host, value = self._step[name]
            if name == ATTENTION_MASK:
                host[:, total:] = 0
                host[:, :total] = array
            else:
                host[...] = array
            if self._where[0] != "cpu":  # on the CPU the value wraps `host` itself
                value.update_inplace(host)
        self._execute(self._graph_id, self._step_call)
        logits = self._logits.numpy()  # from a device: a copy already; on the CPU: the buffer, the next step's
        return logits.copy() if self._where[0] == "cpu" else logits


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
