"""The files beside a model.onnx that let other tools open its folder as it is, in a run and in a bundle alike.

    config.json              the source checkpoint's Hugging Face config (Optimum's ORTModelForCausalLM reads the
                             model type, heads and head width from it)
    generation_config.json   eos/bos ids: runtimes/, transformers' generate() and Optimum stop at end of sequence
    genai_config.json        onnxruntime-genai's description of the graph (`og.Model(folder)`)
    tokenizer.json           the fast tokenizer (runtimes/, genai and AutoTokenizer read it)
    tokenizer_config.json    AutoTokenizer's and genai's settings over it, naming the inputs our graphs take

Every variant folder of a run gets them when its stage publishes it (pipeline/manifest.py records them with the
model's files), so `ORTModelForCausalLM.from_pretrained(RUN/variants/w8a8)` and `og.Model(RUN/variants/w8a8)`
work on the folder in place; `pipeline package` copies them into the bundle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from models.errors import UserError
from runtimes.bundle import file_sha256
from runtimes.contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, PAST_KEY, PAST_VALUE, POSITION_IDS, PRESENT_KEY,
                               PRESENT_VALUE, Contract, read_contract)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
GENAI_FILE = "genai_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
LOADER_FILES = (CONFIG_FILE, GENERATION_FILE, GENAI_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
# What the tokenizer hands the model: without this, a tokenizer_config.json that names none makes transformers'
# fast tokenizer also emit token_type_ids, which no decoder graph takes (Optimum's generate() then fails).
MODEL_INPUT_NAMES = [INPUT_IDS, ATTENTION_MASK]
# onnxruntime-genai model types whose decoder takes our separate past/present key and value names. Its "gpt2"
# type expects one combined `past_%d` tensor per layer, so GPT-2 (and anything else) uses the generic "decoder".
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}


def source_config(model: str | Path) -> bytes:
    """The Hugging Face config.json of a source checkpoint, as export records it in the run: a directory's own
    file byte for byte, or for a GGUF file the config transformers reads from its metadata (with the head width
    models.hf corrects), without the quantization record that would make transformers expect GGUF weights."""
    from models.hf import read_config, resolve_source

    src = resolve_source(model)
    if not src.gguf_file:
        return (src.directory / CONFIG_FILE).read_bytes()
    config = read_config(src).to_dict()
    config.pop("quantization_config", None)
    return (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode()


def token_ids(source: dict) -> dict:
    """bos/eos/pad ids of the source; pad is eos (nothing is padded at batch 1, but genai wants an id)."""
    eos = source.get("eos_token_id")
    ids = {"bos_token_id": source.get("bos_token_id"), "eos_token_id": eos,
           "pad_token_id": eos[0] if isinstance(eos, list) and eos else eos}
    return {k: v for k, v in ids.items() if v is not None}


def generation_config(source: dict, contract: Contract) -> dict:
    """Hugging Face-style generation defaults; runtimes/ reads eos_token_id from it to stop generating."""
    return {**token_ids(source), "do_sample": False, "max_length": contract.max_position_embeddings}


def genai_type(family: str) -> str:
    return GENAI_TYPES.get(family, "decoder")


def genai_config(source: dict, contract: Contract) -> dict:
    """onnxruntime-genai's config for this folder.

    past_present_share_buffer: genai then allocates past and present once at max_length and passes the same
    buffer as both. GroupQueryAttention (our fused graphs) detects that (past pointer == present pointer) and
    appends in place, reading lengths from the attention mask genai keeps at the true length. The unfused graph
    grows the cache with Concat, whose output cannot live in a fixed max_length buffer, so it must be false there.
    """
    ids = token_ids(source)
    context = contract.max_position_embeddings
    return {
        "model": {
            "type": genai_type(contract.family),
            "bos_token_id": ids.get("bos_token_id", 0),
            "eos_token_id": ids.get("eos_token_id", -1),
            "pad_token_id": ids.get("pad_token_id", 0),
            "vocab_size": contract.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": contract.head_dim,
                "hidden_size": contract.hidden_size,
                "num_attention_heads": contract.num_heads,
                "num_key_value_heads": contract.num_kv_heads,
                "num_hidden_layers": contract.num_layers,
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                           "past_key_names": PAST_KEY.format("%d"), "past_value_names": PAST_VALUE.format("%d")},
                "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY.format("%d"),
                            "present_value_names": PRESENT_VALUE.format("%d")},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": contract.fused_attention,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0},
    }


def tokenizer_config(source: dict, tokenizer_json: Path, contract: Contract) -> dict:
    """The source checkpoint's tokenizer_config.json when it still matches the run manifest's record of it, else
    a minimal one over tokenizer.json (genai's tokenizer reads the class and special tokens from it); either way
    naming the two inputs our graphs take."""
    own = Path(source.get("path", "")) / TOKENIZER_CONFIG_FILE
    recorded = (source.get("files") or {}).get(str(own))
    if recorded and own.is_file():
        if file_sha256(own) != recorded:
            raise UserError(f"{own} changed since `pipeline export` recorded it: re-export the model")
        try:
            config = json.loads(own.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{own} is not valid JSON ({e}): fix it and re-export the model") from e
        if isinstance(config, dict):
            return {**config, "model_input_names": MODEL_INPUT_NAMES}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": contract.max_position_embeddings,
              "clean_up_tokenization_spaces": False, "model_input_names": MODEL_INPUT_NAMES}
    for key, token_id in token_ids(source).items():
        first = token_id[0] if isinstance(token_id, list) else token_id
        if key != "pad_token_id" and tok.id_to_token(first) is not None:
            config[key.removesuffix("_id")] = tok.id_to_token(first)
    return config


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (a run's variants share one tokenizer, Gemma's is 33 MB), else a
    copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_loader_files(folder: Path, source: dict, tokenizer: Path | None, config: Path | None) -> list[str]:
    """Each of LOADER_FILES that `folder` (holding model.onnx) lacks, from the run's source record, tokenizer.json
    and config.json (None: the run has none; that file is then left out). Returns the names written."""
    import onnx

    contract = read_contract(onnx.load(str(folder / MODEL_FILE), load_external_data=False), folder / MODEL_FILE)
    written = []

    def want(name: str) -> bool:
        if (folder / name).exists():
            return False
        written.append(name)
        return True

    if config is not None and want(CONFIG_FILE):
        link_or_copy(config, folder / CONFIG_FILE)
    if want(GENERATION_FILE):
        write_json(folder / GENERATION_FILE, generation_config(source, contract))
    if want(GENAI_FILE):
        write_json(folder / GENAI_FILE, genai_config(source, contract))
    if tokenizer is not None:
        if want(TOKENIZER_FILE):
            link_or_copy(tokenizer, folder / TOKENIZER_FILE)
        if want(TOKENIZER_CONFIG_FILE):
            write_json(folder / TOKENIZER_CONFIG_FILE, tokenizer_config(source, folder / TOKENIZER_FILE, contract))
    return written
