"""Stage options, each declared once: its name, type, default, bounds and help.

A stage config is a frozen dataclass whose fields are made by `option()`. From that one declaration come the
click option (`--calib-windows` for the field `calib_windows`), the TOML key of `pipeline run` (the field's
name), the checks every value passes before any work starts (`check_options`, called by the config's
`__post_init__`, so the CLI, a TOML file and Python get the same one line), and docs/config.md (`markdown()`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import click

from models.errors import UserError


@dataclass(frozen=True)
class Option:
    kind: type                       # int, float, bool or str: what a value must be
    help: str                        # one sentence for --help and docs/config.md
    lo: float | None = None          # smallest value allowed (numbers)
    hi: float | None = None          # largest value allowed (numbers)
    choices: tuple = ()              # the only values allowed, if any
    optional: bool = False           # None is a value (meaning: decided later, see help)
    many: bool = False               # a tuple of values: the flag repeats; a comma also separates them
    off: str | None = None           # a boolean's negative flag (--no-rotate); a bare flag when None


def option(kind: type, default: Any, help: str, **spec) -> Any:
    """A dataclass field declared as a stage option (see Option for `spec`)."""
    opt = Option(kind, help, **spec)
    if opt.many:
        return field(default=tuple(default), metadata={"option": opt})
    return field(default=default, metadata={"option": opt})


def options_of(cls) -> list[tuple[dataclasses.Field, Option]]:
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def check_options(config) -> None:
    """Every declared option of `config` holds a value of its kind within its bounds; a string or list given for
    a `many` option becomes a tuple. The first bad one is a UserError naming it."""
    for f, opt in options_of(type(config)):
        value = getattr(config, f.name)
        if opt.many:
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{f.name} is {value!r}: give a list of {_kind_name(opt)}")
            items = tuple(v for item in value
                          for v in ([s.strip() for s in item.split(",")] if isinstance(item, str) else [item]) if v != "")
            object.__setattr__(config, f.name, items)
            for item in items:
                _check_value(f.name, item, opt)
        else:
            _check_value(f.name, value, opt)


def _kind_name(opt: Option) -> str:
    return {int: "whole numbers", float: "numbers", bool: "true or false", str: "strings"}[opt.kind]


def _check_value(name: str, value, opt: Option) -> None:
    if value is None and opt.optional:
        return
    if opt.kind is bool:
        ok = isinstance(value, bool)
    elif opt.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif opt.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if ok and opt.choices:
        ok = value in opt.choices
    if ok and opt.lo is not None:
        ok = value >= opt.lo
    if ok and opt.hi is not None:
        ok = value <= opt.hi
    if not ok:
        raise UserError(f"{name} is {value!r}: {expected(opt)}")


def expected(opt: Option) -> str:
    """What the option takes, in words: for error lines and docs/config.md."""
    if opt.choices:
        text = "one of " + ", ".join(map(str, opt.choices))
    elif opt.kind is bool:
        text = "true or false"
    elif opt.kind is str:
        text = "a string"
    else:
        text = "a whole number" if opt.kind is int else "a finite number"
        if opt.lo is not None and opt.hi is not None:
            text += f" from {opt.lo} to {opt.hi}"
        elif opt.lo is not None:
            text += f" of at least {opt.lo}"
        elif opt.hi is not None:
            text += f" of at most {opt.hi}"
    return "give " + text


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def click_options(cls, skip: tuple[str, ...] = ()):
    """Decorator: one click option per declared option of `cls` (but those in `skip`, which the command takes
    otherwise, e.g. as an argument), passed under the field's name.

    Bounds are left to the config's own checks, so a value outside them is the same one line from any entry;
    click turns the text into an int or float and offers the choices in --help.
    """
    def decorate(fn):
        for f, opt in reversed(options_of(cls)):
            if f.name in skip:
                continue
            flag = flag_name(f.name)
            kwargs: dict = {"help": opt.help, "default": f.default, "show_default": f.default not in (None, "", ())}
            if f.default is dataclasses.MISSING:
                kwargs.update(required=True, default=None, show_default=False)
            if opt.kind is bool:
                decls = [f"{flag}/{opt.off}"] if opt.off else [flag]
                kwargs["is_flag"] = True
            else:
                decls = [flag]
                kwargs["type"] = (click.Choice(opt.choices) if opt.choices
                                  else {int: click.INT, float: click.FLOAT, str: click.STRING}[opt.kind])
            if opt.many:
                kwargs.update(multiple=True, default=f.default or None, show_default=bool(f.default))
            fn = click.option(*decls, f.name, **kwargs)(fn)
        return fn

    return decorate


def toml_value(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def markdown(tables: dict[str, type]) -> str:
    """docs/config.md's tables: every option of every stage, as the CLI flag and the TOML key."""
    lines = []
    for table, cls in tables.items():
        lines += [f"## [{table}]", "", "| TOML key | CLI flag | default | takes | what it does |", "|---|---|---|---|---|"]
        for f, opt in options_of(cls):
            default = "required" if f.default is dataclasses.MISSING else f"`{toml_value(f.default)}`"
            flag = f"`{flag_name(f.name)}/{opt.off}`" if opt.off else f"`{flag_name(f.name)}`"
            takes = expected(opt).removeprefix("give ") + (" (a list)" if opt.many else "")
            lines.append(f"| `{f.name}` | {flag} | {default} | {takes}{' or unset' if opt.optional else ''} | "
                         + opt.help.replace("|", "\\|") + " |")
        lines.append("")
    return "\n".join(lines)


# ---- checks that need the model -----------------------------------------------------------------------------

def model_context(path) -> int:
    """The longest sequence a variant was exported for, from the contract in its metadata."""
    import onnx

    from runtimes.contract import read_contract

    return read_contract(onnx.load(str(path), load_external_data=False), path).max_position_embeddings


def fits_context(what: str, tokens: int, path, variant: str) -> None:
    context = model_context(path)
    if tokens > context:
        raise UserError(f"{what} is {tokens} tokens, more than variant {variant!r}'s context of {context}")


# ---- options several stages share ---------------------------------------------------------------------------

def threads(default: int = 2) -> Any:
    from runtimes.session import MAX_THREADS

    return option(int, default, "Intra-op threads.", lo=1, hi=MAX_THREADS)


PROVIDERS = ("cpu", "cuda", "tensorrt")  # runtimes.providers.FACTORIES' names


def provider() -> Any:
    return option(str, "cpu", "Execution provider (cuda and tensorrt need the gpu / tensorrt extra).",
                  choices=PROVIDERS)


def variants(what: str) -> Any:
    return option(str, (), f"Variant(s) to {what} (fp32, fused, fused-fp16, w8a8, static, w8, w4, w8a8-native); "
                           "repeat the flag or separate by commas; default: every variant of the run.", many=True)
