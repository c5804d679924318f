"""The memory a model needs on the device for a given context, from its contract and file size (no session).

Peak resident memory of generation on the CPU is, in order of size:

* the weights, as stored (onnxruntime keeps initializers at their stored width);
* the KV cache, allocated once for the whole request (prompt + new tokens, `Generator.prefill`'s capacity):
  2 (keys, values) x layers x KV heads x head width x positions x the cache's element size;
* a fused graph's rotary tables, computed when the session is created for every position the graph serves
  (its contract's max_position_embeddings: `pipeline package --context` sizes it): cos and sin, float32, rotary
  width / 2 per position and rotary base (Gemma 3 has two: 67 MB at 32,768 positions);
* prefill's activations, bounded by the chunk the in-place cache feeds at a time (`PREFILL_CHUNK`): the chunk's
  hidden, projection and MLP rows, and GroupQueryAttention's float32 scores, heads x chunk x positions;
* the runtime itself: Python, numpy, onnxruntime and a session (`RUNTIME_BYTES`, measured).

Measured on SmolLM2-135M fp32 (515 MiB of weights), 1536-token prompt + 16 new tokens: 688 MiB after load,
787 MiB after prefill (68 MiB of cache, 31 MiB of activations); the estimate gives 782 MiB.
"""

from __future__ import annotations

from runtimes.contract import Contract

RUNTIME_BYTES = 148 << 20  # process, libraries and session (SmolLM2: 688 MiB loaded - 515 of weights - 2 of tables)
ACTIVATION_SLACK = 1.25    # the arena rounds its blocks up and keeps the largest


def kv_bytes_per_token(contract: Contract, batch: int = 1) -> int:
    """Bytes of KV cache per position of context."""
    itemsize = 2 if contract.kv_dtype == "float16" else 4
    return 2 * contract.num_layers * contract.num_kv_heads * contract.head_dim * itemsize * batch


def rotary_table_bytes(contract: Contract) -> int:
    """The float32 cos and sin tables of a fused graph (exporters/optimize.py `rotary_nodes`): one pair per rotary
    base, two stacked pairs with LongRoPE (short and long factors)."""
    if not contract.fused_attention or contract.rope_theta is None:
        return 0
    tables = 2 if contract.rope_local_theta is not None else 1
    scaling = contract.rope_scaling or {}
    if (scaling.get("rope_type") or scaling.get("type")) == "longrope":
        tables *= 2
    return tables * 2 * contract.max_position_embeddings * ((contract.rotary_dim or contract.head_dim) // 2) * 4


def prefill_activation_bytes(contract: Contract, context: int, chunk: int, intermediate_size: int,
                             batch: int = 1) -> int:
    """The largest set of float32 activations one prefill chunk holds at once: rows of the residual stream and its
    norms, the packed q/k/v projection, the gated MLP's two halves, the attention scores of every head against
    the whole context, and one row of logits."""
    chunk = min(chunk, context)
    qkv = (contract.num_heads + 2 * contract.num_kv_heads) * contract.head_dim
    rows = chunk * (3 * contract.hidden_size + qkv + 2 * intermediate_size)
    scores = contract.num_heads * chunk * context
    return int(4 * batch * (rows + scores + contract.vocab_size) * ACTIVATION_SLACK)


def memory_need(contract: Contract, weights_bytes: int, context: int, chunk: int, intermediate_size: int,
                batch: int = 1) -> dict:
    """Peak resident bytes of generating `context` positions (prompt + new tokens), by part."""
    parts = {"weights": weights_bytes, "rotary_tables": rotary_table_bytes(contract),
             "kv_cache": kv_bytes_per_token(contract, batch) * context,
             "activations": prefill_activation_bytes(contract, context, chunk, intermediate_size, batch),
             "runtime": RUNTIME_BYTES}
    return {"context": context, "total_bytes": sum(parts.values()), **{f"{k}_bytes": v for k, v in parts.items()}}
