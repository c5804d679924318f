"""Checks of stage options, run when a stage config is built: from the CLI, a TOML file or Python alike.

Each failure is a UserError whose one line names the option and the values it takes, before any work starts.
"""

from __future__ import annotations

from models.errors import UserError


def number(name: str, value, lo: float | None = None, hi: float | None = None, integer: bool = True,
           optional: bool = False) -> None:
    """`value` is an int (or a float where `integer` is False) within [lo, hi]; None passes where `optional`."""
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value != value:  # bool is an int; NaN != NaN
        raise UserError(f"{name} is {value!r}: give {'a whole number' if integer else 'a number'}"
                        + _range(lo, hi))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UserError(f"{name} is {value}: give {'a whole number' if integer else 'a number'}{_range(lo, hi)}")


def choice(name: str, value, options: tuple, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in options:
        raise UserError(f"{name} is {value!r}: choose one of {', '.join(map(str, options))}")


def flag(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise UserError(f"{name} is {value!r}: give true or false")


def text(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise UserError(f"{name} is {value!r}: give a string")


def model_context(path) -> int:
    """The longest sequence a variant was exported for, from the contract in its metadata."""
    import onnx

    from runtimes.contract import read_contract

    return read_contract(onnx.load(str(path), load_external_data=False), path).max_position_embeddings


def fits_context(what: str, tokens: int, path, variant: str) -> None:
    context = model_context(path)
    if tokens > context:
        raise UserError(f"{what} is {tokens} tokens, more than variant {variant!r}'s context of {context}")


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" of at least {lo}"
    return f" of at most {hi}" if hi is not None else ""
