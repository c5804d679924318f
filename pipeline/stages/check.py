"""Stage `check`: every ONNX variant against the PyTorch model, on text the quantizer never saw.

Per variant: max |logit difference|, teacher-forced top-1 agreement, KL(PyTorch || ONNX), perplexity of both,
greedy tokens over N decode steps through the KV cache (ONNX through runtimes/, the code that ships), the share
of MatMul FLOPs that run in int8, and the file size. Each variant kind has thresholds; a miss fails the stage.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import psutil

from exporters.acceptance import THRESHOLDS, Thresholds
from models.errors import UserError
from pipeline import options, progress
from pipeline.data import token_windows
from pipeline.manifest import RunDir
from pipeline.options import check_options, option
from runtimes.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_names


MAX_WINDOWS = 4096  # evaluation windows: more than any text here fills, few enough to finish


@dataclass(frozen=True)
class CheckConfig:
    variant: tuple[str, ...] = options.variants("check")
    model: str | None = option(str, None, "PyTorch reference checkpoint (default: the one the run exported).",
                               optional=True)
    text: str | None = option(str, None, "Text file to evaluate on (default: the corpus's valid split).",
                              optional=True)
    windows: int = option(int, 16, "Evaluation windows, spread over the text.", lo=1, hi=MAX_WINDOWS)
    window: int = option(int, 128, "Tokens per window (at most the model's context).", lo=2)
    steps: int = option(int, 16, "Greedy decode steps through the KV cache.", lo=0)
    prompt_tokens: int = option(int, 16, "Prompt tokens before the greedy steps.", lo=1)
    provider: str = options.provider()
    threads: int = options.threads()
    compare: tuple[str, ...] = option(str, (), "llama.cpp files measured beside the variants, on the same text "
                                      "against the same reference: llamacpp (RUN/peers/model.gguf, else a .gguf "
                                      "source) or llamacpp:NAME (RUN/peers/NAME.gguf); not judged.", many=True)
    thresholds: dict = field(default_factory=dict)  # variant -> Thresholds overrides (Python only)

    def __post_init__(self):
        check_options(self)
LOGIT_COPIES = 8    # float64 (S, V) arrays alive at once while one window is compared, with the float32 logits


def check_fits(config: CheckConfig, context: int, vocab: int, heads: int, available: int) -> None:
    """A window must fit the model's context and, with its logits and attention scores, this machine's memory."""
    if config.window > context:
        raise UserError(f"window is {config.window} tokens, longer than the model's context of {context}: "
                        f"give at most {context}")
    if config.prompt_tokens + config.steps > context:
        raise UserError(f"prompt_tokens + steps ({config.prompt_tokens} + {config.steps}) exceed the "
                        f"model's context of {context}")
    def need(window: int) -> int:  # bytes: float64 logit copies, and float32 scores for the model and its grads
        return 8 * LOGIT_COPIES * window * vocab + 4 * 2 * heads * window ** 2

    if need(config.window) > 0.8 * available:
        fits = [w for w in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 2) if need(w) <= 0.8 * available]
        advice = f"give a window of at most {fits[0]}" if fits else "free memory first"
        raise UserError(f"a window of {config.window} tokens needs about {need(config.window) / 2**30:.1f} GiB for "
                        f"its logits (vocabulary {vocab}) and attention, more than the {available / 2**30:.1f} GiB "
                        f"available: {advice}")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    """ref/got: (S, V) logits for positions predicting `targets` (S,)."""
    lr, lg = log_softmax(ref), log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(lr) * (lr - lg), axis=-1)))
    idx = np.arange(len(targets))
    return {"max_abs_diff": float(np.max(np.abs(ref.astype(np.float64) - got))),
            "top1": float(np.mean(ref.argmax(-1) == got.argmax(-1))), "kl": kl,
            "nll_ref": float(-lr[idx, targets].mean()), "nll_got": float(-lg[idx, targets].mean())}


def int8_flop_share(model_path) -> dict:
    """Shares of weight-MatMul FLOPs (K*N per token), read from the graph itself so they cannot disagree with
    what runs: int8/int4 weights; static W8A8 (QDQ weight and activation, or pipeline's StaticInt8MatMul); int8
    compute, which adds the MatMulNBits with accuracy_level 4, whose activations the CPU kernel quantizes to int8
    per block at run time."""
    import onnx
    from onnx import numpy_helper

    from exporters.graph import TABLE_MAP_SUFFIX

    m = onnx.load(str(model_path), load_external_data=False)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def dq_int(name):  # name produced by DequantizeLinear of an int initializer?
        n = producer.get(name)
        return n is not None and n.op_type == "DequantizeLinear" and n.input[0] in inits

    def blocks(name):  # rows per token: K/b when A is (batch, seq, K/b, b), as an online rotation reshapes it
        n = producer.get(name)
        if n is None or n.op_type != "Reshape" or n.input[1] not in inits:
            return 1
        shape = numpy_helper.to_array(inits[n.input[1]])
        return int(np.prod(shape[2:-1])) if shape.size > 3 and (shape[2:-1] > 0).all() else 1

    total = int8_w = int8_wa = int8_dyn = 0
    for n in g.node:
        if n.op_type == "MatMulNBits":  # weight-only: int weights; int8 compute at accuracy level 4
            attrs = {a.name: a.i for a in n.attribute}
            total += attrs["K"] * attrs["N"]
            int8_w += attrs["K"] * attrs["N"]
            int8_dyn += attrs["K"] * attrs["N"] if attrs.get("accuracy_level") == 4 else 0
        elif n.op_type == "BlockInt8MatMul":  # pipeline's native kernel of 8-bit MatMulNBits: blocks (N, K/32, 32)
            attrs = {a.name: a for a in n.attribute}  # or packed codes: K and each run's rows as attributes
            size = attrs["K"].i * sum(attrs["rows"].ints) if "K" in attrs else int(np.prod(inits[n.input[1]].dims))
            total += size
            int8_w += size
            int8_dyn += size
        elif n.op_type == "StaticInt8MatMul":  # pipeline's native W8A8 kernel: w_packed is (N/16, K/4, 64)
            panels, groups, _ = inits[n.input[1]].dims
            total += 64 * panels * groups
            int8_w += 64 * panels * groups
            int8_wa += 64 * panels * groups
        elif n.op_type == "MatMul" and n.name.endswith(TABLE_MAP_SUFFIX):  # a tied table's map: the lookup's
            continue
        elif n.op_type == "MatMul" and n.input[1] in inits:  # float weight
            dims = inits[n.input[1]].dims
            total += dims[-2] * dims[-1] * blocks(n.input[0])
        elif n.op_type == "MatMul" and dq_int(n.input[1]):  # QDQ weight
            dims = inits[producer[n.input[1]].input[0]].dims
            total += dims[0] * dims[1]
            int8_w += dims[0] * dims[1]
            a = producer.get(n.input[0])
            if a is not None and a.op_type == "DequantizeLinear":
                int8_wa += dims[0] * dims[1]
        # MatMuls of two activations (attention scores) are not weight MatMuls and are not counted
    share = (lambda x: x / total) if total else (lambda x: 0.0)
    return {"int8_weight_flop_share": share(int8_w), "int8_w8a8_flop_share": share(int8_wa),
            "int8_compute_flop_share": share(int8_wa + int8_dyn)}


def torch_reference(run: RunDir, config: CheckConfig):
    from models.hf import load_model

    path = config.model or run.artifact("source")["path"]
    return load_model(path).model


PROMPT_CANDIDATES = 4  # windows whose opening is tried as the greedy prompt


def greedy_reference(model, windows, config: CheckConfig) -> tuple[list[int], list[int]]:
    """(prompt, PyTorch's greedy tokens after it): the opening of whichever of the first few windows makes the
    reference produce the most distinct tokens. A reference that repeats one or two tokens (a small model on
    some text) would be matched by almost anything, and its agreement would prove little."""
    import torch

    best = None
    for ids in windows[:PROMPT_CANDIDATES]:
        prompt = ids[:config.prompt_tokens]
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), config.steps)[0].tolist()
        if best is None or len(set(ref)) > len(set(best[1])):
            best = (prompt, ref)
    return best


def check_variant(name: str, path, model, windows, config: CheckConfig,
                  reference: tuple[list[int], list[int]]) -> dict:
    import torch

    from runtimes.bench import model_bytes
    from runtimes.generate import greedy_tokens
    from runtimes.providers import resolve
    from runtimes.session import open_session

    sess = open_session(path, resolve(config.provider), threads=config.threads)
    per_window = []
    for ids in progress.each(windows, f"check {name}", unit="window"):
        x = np.array([ids], dtype=np.int64)
        with torch.no_grad():
            ref = model(torch.from_numpy(x))[0][0].numpy()
        got = prefill_logits(sess, x)
        per_window.append(compare_logits(ref[:-1], got[:-1], np.array(ids[1:])))
    prompt, ref_tokens = reference
    got_tokens = greedy_tokens(sess, prompt, config.steps)
    return {**summarize(name, per_window, ref_tokens, got_tokens), "provider": sess.provider,
            **int8_flop_share(path), "size_bytes": model_bytes(path)}


@contextlib.contextmanager
def native_stderr_silenced():
    """Python's sys.stderr and file descriptor 2 pointed away for the duration (llama-cpp-python's log callback
    prints to the first, C code writes to the second); errors still arrive as Python exceptions."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def check_llamacpp(name: str, gguf: str, model, windows, config: CheckConfig,
                   reference: tuple[list[int], list[int]]) -> dict:
    """A llama.cpp file measured as a variant is (same windows, same PyTorch reference, same greedy prompt), through
    llama-cpp-python with every position's logits kept. Its vocabulary must be the run's: the windows are the
    run tokenizer's ids."""
    import torch

    try:
        from llama_cpp import Llama
    except ImportError as e:
        from pipeline.peers import INSTALL

        raise UserError(f"--compare {name} needs llama-cpp-python: {INSTALL['llamacpp']}") from e
    from pipeline.peers import gguf_identity

    prompt, ref_tokens = reference
    n_ctx = max(max(len(w) for w in windows), len(prompt) + len(ref_tokens)) + 8
    with native_stderr_silenced():  # llama.cpp warns from C on stderr (a context past the trained one, say)
        llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, n_threads=config.threads,
                    n_threads_batch=config.threads, logits_all=True, verbose=False)
    if llm.n_vocab() != model.config.vocab_size:
        raise UserError(f"{gguf} has a vocabulary of {llm.n_vocab()} tokens, the run's model "
                        f"{model.config.vocab_size}: compare a GGUF of the same model")
    per_window = []
    for ids in progress.each(windows, f"check {name}", unit="window"):
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0][0].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)], dtype=np.float32)
        per_window.append(compare_logits(ref[:-1], got[:-1], np.array(ids[1:])))
    llm.reset()
    llm.eval(prompt)
    got_tokens = []
    for _ in ref_tokens:
        got_tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got_tokens[-1]])
    identity = gguf_identity(gguf, llm.metadata)
    return {**summarize(name, per_window, ref_tokens, got_tokens), "provider": "llama.cpp", "peer": True,
            "gguf_type": identity["gguf_type"], "model": identity["model"], "size_bytes": identity["file_bytes"],
            "int8_weight_flop_share": None, "int8_w8a8_flop_share": None, "int8_compute_flop_share": None}


def summarize(name: str, per_window: list[dict], ref_tokens: list[int], got_tokens: list[int]) -> dict:
    """One row from the per-window comparisons and the greedy tokens."""
    match = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b), len(ref_tokens))
    nll_ref = float(np.mean([w["nll_ref"] for w in per_window]))
    nll_got = float(np.mean([w["nll_got"] for w in per_window]))
    return {"variant": name, "max_abs_diff": max(w["max_abs_diff"] for w in per_window),
            "top1": float(np.mean([w["top1"] for w in per_window])),
            "kl": float(np.mean([w["kl"] for w in per_window])),
            "ppl_ref": float(np.exp(nll_ref)), "ppl": float(np.exp(nll_got)),
            "ppl_increase": float(np.exp(nll_got - nll_ref) - 1.0),
            "greedy_match": match / len(ref_tokens) if ref_tokens else 1.0, "greedy_ref": ref_tokens,
            "greedy": got_tokens, "greedy_distinct": len(set(ref_tokens))}


def prefill_logits(sess, x: np.ndarray) -> np.ndarray:
    """Teacher-forced logits (S, V) of one window through the KV-cache graph with an empty past."""
    c = sess.contract
    kv = np.zeros((1, c.num_kv_heads, 0, c.head_dim), dtype=sess.kv_dtype)
    feeds = {INPUT_IDS: x, ATTENTION_MASK: np.ones_like(x), POSITION_IDS: np.arange(x.shape[1])[None],
             **dict.fromkeys(past_names(c.num_layers), kv)}
    feeds = {k: v for k, v in feeds.items() if k in sess.input_names}
    return sess.run(feeds, [LOGITS])[0][0].astype(np.float32)


def judge(name: str, r: dict, config: CheckConfig) -> list[str]:
    """Names of the thresholds this variant misses."""
    # a native-kernel variant computes what its source does; a float16 KV cache is judged as its source
    base = name.removesuffix("-kv16").removesuffix("-native")
    t = config.thresholds.get(name) or THRESHOLDS.get(name) or THRESHOLDS.get(base) or THRESHOLDS["static"]
    misses = []
    if t.max_abs_diff is not None and r["max_abs_diff"] > t.max_abs_diff:
        misses.append(f"max_abs_diff {r['max_abs_diff']:.3g} > {t.max_abs_diff}")
    if r["top1"] < t.min_top1:
        misses.append(f"top1 {r['top1']:.3f} < {t.min_top1}")
    if t.max_kl is not None and r["kl"] > t.max_kl:
        misses.append(f"kl {r['kl']:.3g} > {t.max_kl}")
    if t.max_ppl_increase is not None and r["ppl_increase"] > t.max_ppl_increase:
        misses.append(f"ppl +{100 * r['ppl_increase']:.2f}% > +{100 * t.max_ppl_increase:.1f}%")
    if r["greedy_match"] < t.min_greedy_match:
        misses.append(f"greedy match {r['greedy_match']:.2f} < {t.min_greedy_match}")
    return misses


def check(run: RunDir, config: CheckConfig) -> dict:
    from pipeline.stages.bench import peer_model

    names = list(config.variant) or run.variants()
    if not names:
        raise UserError(f"run {run.root} has no ONNX variants to check: run `pipeline export` first")
    wrong = [c for c in config.compare if c.partition(":")[0] != "llamacpp"]
    if wrong:
        raise UserError(f"check compares llama.cpp files only (llamacpp, llamacpp:NAME), not {', '.join(wrong)}")
    paths = {n: run.verified(n) for n in names}
    peers = {spec: peer_model(run, "llamacpp", spec.partition(":")[2]) for spec in config.compare}
    model = torch_reference(run, config)
    dims = model.config
    check_fits(config, dims.max_position_embeddings, dims.vocab_size, dims.num_heads,
               psutil.virtual_memory().available)
    windows = token_windows(run.root, "valid", config.text, config.windows, config.window)
    reference = greedy_reference(model, windows, config)
    rows = []
    for n in names:
        r = check_variant(n, paths[n], model, windows, config, reference)
        r["failed"] = judge(n, r, config)
        rows.append(r)
    for spec, gguf in peers.items():
        rows.append({**check_llamacpp(spec, gguf, model, windows, config, reference), "failed": []})
    results = {"variants": rows, "passed": all(not r["failed"] for r in rows),
               "tokens_evaluated": sum(len(w) - 1 for w in windows),
               "greedy_steps": len(reference[1]), "greedy_distinct": len(set(reference[1]))}
    cfg = {k: v for k, v in asdict(config).items() if k != "thresholds"}
    run.record("check", cfg, {n: str(p) for n, p in paths.items()}, results)
    return results


def render_table(results: dict) -> str:
    head = f"{'variant':<11} {'max|dlogit|':>11} {'top1':>6} {'KL':>9} {'ppl ref':>8} {'ppl':>8} {'dppl':>7} " \
           f"{'greedy':>6} {'int8 W':>6} {'W8A8':>5} {'i8 mm':>5} {'MB':>7}  verdict"
    lines = [head, "-" * len(head)]
    def share(x, width: int) -> str:
        return f"{x:>{width}.2f}" if x is not None else f"{'-':>{width}}"

    for r in results["variants"]:
        name = f"{r['variant']} {r['gguf_type']}" if r.get("gguf_type") else r["variant"]
        verdict = "(peer, not judged)" if r.get("peer") else \
            "ok" if not r["failed"] else "FAIL: " + "; ".join(r["failed"])
        lines.append(f"{name:<11} {r['max_abs_diff']:>11.3g} {r['top1']:>6.3f} {r['kl']:>9.2e} "
                     f"{r['ppl_ref']:>8.2f} {r['ppl']:>8.2f} {100 * r['ppl_increase']:>+6.2f}% "
                     f"{r['greedy_match']:>6.2f} {share(r['int8_weight_flop_share'], 6)} "
                     f"{share(r['int8_w8a8_flop_share'], 5)} {share(r['int8_compute_flop_share'], 5)} "
                     f"{r['size_bytes'] / 1e6:>7.2f}  " + verdict)
    lines.append("(int8 W / W8A8 / i8 mm: share of weight-MatMul FLOPs with int weights / static int8 weights and "
                 "activations / int8 arithmetic, counting MatMulNBits at accuracy level 4)")
    if "greedy_steps" in results:
        lines.append(f"(greedy: {results['greedy_steps']} steps, whose PyTorch reference has "
                     f"{results['greedy_distinct']} distinct tokens"
                     + ("; it repeats itself, so agreeing with it proves little)"
                        if results["greedy_distinct"] * 4 < results["greedy_steps"] else ")"))
    lines.append(f"({results['tokens_evaluated']} tokens evaluated; "
                 f"{'all variants passed' if results['passed'] else 'some variants FAILED'})")
    return "\n".join(lines)
