"""The one reader of vLLM command lines (`local.extraArgs`, `inference.extraArgs`), as vLLM's own parser reads them.

vLLM's `FlexibleArgumentParser` accepts every flag in several spellings: `--max_model_len` and `--max-model-len`,
`--port=8000` and `--port 8000`, short aliases (`-tp 2`), unique prefixes (`--tensor-parallel 2`, argparse's
abbreviations), dotted JSON fields (`--compilation-config.level 3`) and `--config FILE` (more options from a file).
A check that compares strings misses most of them; `parse` resolves each argument to the flag (its `dest`) vLLM
would set, so reserved flags, keys on the command line and stray values are refused whatever the spelling.

The table of flags (`vllm_flags_table.py`) is generated from the installed vLLM's own parser:

    python -m selflengthen.pipeline.vllm_flags_gen --write     # after updating vLLM; tests check it is current

so validation needs no vLLM (the operator's and the stage images have none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .vllm_flags_table import ALLOW_ABBREV, OPTIONS
from .yamlfile import shorten

# What no extraArgs may set, on a laptop or a cluster: where the key belongs instead.
SECRET_FLAGS = {
    "api_key": "the server's key is read from the VLLM_API_KEY environment variable, never the command line",
    "hf_token": "a Hugging Face token belongs in HF_TOKEN (on a cluster: inference.hfTokenSecret)",
}
# Flags that read more options from somewhere validation cannot see.
OPAQUE_FLAGS = {"config": "--config reads more options from a file that cannot be checked here: pass them as "
                          "extraArgs"}
# Values that look like credentials (OpenAI/HF/GitHub/Slack tokens, AWS access key ids).
_CREDENTIAL = re.compile(r"(?<![A-Za-z0-9])(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                         r"xox[abpr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16})")


@dataclass(frozen=True)
class Arg:
    """One argument of a vLLM command line: a flag (dest set) with the values it takes, or a stray value."""

    index: int
    written: str  # as the user wrote it (the flag part, or the value)
    dest: str | None  # vLLM's destination (None: a positional value, or a flag vLLM does not know)
    flag: str | None  # the canonical spelling (--max-model-len), None for positionals
    values: tuple[str, ...] = ()


class FlagError(ValueError):
    pass


def _canonical_long(arg: str) -> str:
    """FlexibleArgumentParser's normalisation: '_' -> '-' in the name, up to the first '.'."""
    name, dot, rest = arg[2:].partition(".")
    return "--" + name.replace("_", "-") + dot + rest


def _resolve(option: str) -> tuple[str, str] | None:
    """(dest, canonical flag) of an option string as argparse resolves it, abbreviations included."""
    if option in OPTIONS:
        return OPTIONS[option]["dest"], OPTIONS[option]["flag"]
    if not ALLOW_ABBREV:
        return None
    matches = sorted({(OPTIONS[o]["dest"], OPTIONS[o]["flag"]) for o in OPTIONS
                      if o.startswith(option) and (o.startswith("--") == option.startswith("--"))})
    if len(matches) > 1:
        raise FlagError(f"{shorten(option, 60)} is an ambiguous abbreviation (of "
                        f"{', '.join(m[1] for m in matches[:4])}{', ...' if len(matches) > 4 else ''})")
    return matches[0] if matches else None


def _looks_like_flag(arg: str) -> bool:
    return arg.startswith("-") and arg != "-" and not re.fullmatch(r"-\d+(\.\d*)?([eE][-+]?\d+)?", arg)


def parse(args: list[str]) -> list[Arg]:
    """Every argument of a vLLM command line (without the model) resolved as vLLM would read it."""
    out: list[Arg] = []
    i = 0
    while i < len(args):
        start, arg = i, args[i]
        if arg == "--":  # everything after is positional
            out += [Arg(j, a, None, None) for j, a in enumerate(args[i + 1:], i + 1)]
            break
        if not _looks_like_flag(arg):
            out.append(Arg(i, arg, None, None))
            i += 1
            continue
        if arg.startswith("-O") and not arg.startswith("--"):  # vLLM: -O3, -O=3, -O 3 -> --optimization-level
            option, inline = "--optimization-level", (arg[3:] if arg[2:3] == "=" else arg[2:]) or None
        else:
            option, eq, value = arg.partition("=")
            inline = value if eq else None
            if option.startswith("--"):
                option = _canonical_long(option)
        base = option.partition(".")[0] if option.startswith("--") else option
        resolved = _resolve(base)
        dest, flag = resolved if resolved else (None, None)
        nargs = OPTIONS[flag]["nargs"] if flag else None
        if "." in option and option.startswith("--"):
            nargs = None  # --json-arg.field VALUE: one value, always
        if nargs == 0:
            if inline is not None:
                raise FlagError(f"{shorten(arg, 80)}: {flag} takes no value")
            values: tuple[str, ...] = ()
            i += 1
        elif inline is not None:
            values = (inline,)
            i += 1
        elif nargs in ("+", "*", "?"):
            j = i + 1
            while j < len(args) and not _looks_like_flag(args[j]) and args[j] != "--":
                j += 1
                if nargs == "?":
                    break
            values = tuple(args[i + 1:j])
            if nargs == "+" and not values:
                raise FlagError(f"{shorten(arg, 80)}: {flag} needs at least one value")
            i = j
        else:  # one value (flags vLLM does not know are assumed to take one too)
            if i + 1 >= len(args) or (flag and _looks_like_flag(args[i + 1])):
                if flag:
                    raise FlagError(f"{shorten(arg, 80)}: {flag} needs a value")
                values = ()
                i += 1
            else:
                values = (args[i + 1],) if (flag or not _looks_like_flag(args[i + 1])) else ()
                i += 1 + len(values)
        out.append(Arg(start, arg, dest, flag, values))
    return out


def check_extra_args(args: list[str], reserved: dict[str, str]) -> list[str]:
    """Why these extra arguments cannot be passed to vLLM (empty: they can). `reserved`: dest -> the setting that
    owns that flag (e.g. 'max_model_len': 'inference.maxModelLen')."""
    try:
        parsed = parse(args)
    except FlagError as err:
        return [str(err)]
    problems = []
    for a in parsed:
        if a.dest is None and a.flag is None and not _looks_like_flag(a.written):
            problems.append(f"{shorten(a.written, 80)!r} is a value without a flag (vLLM would read it as the model)")
        elif a.dest in reserved:
            spelled = "" if a.written.partition("=")[0] == a.flag else f" (written {shorten(a.written, 60)})"
            problems.append(f"{a.flag}{spelled} is set by selflengthen: use {reserved[a.dest]}")
        elif a.dest in SECRET_FLAGS:
            problems.append(f"{a.flag} must not be given: {SECRET_FLAGS[a.dest]}")
        elif a.dest in OPAQUE_FLAGS:
            problems.append(OPAQUE_FLAGS[a.dest])
    for arg in args:
        if _CREDENTIAL.search(arg):
            problems.append("an argument looks like a credential (a token or access key): keys never go on the "
                            "command line (the Deployment and the process list show it)")
            break
    return problems


def check_positional(value: str) -> str:
    """A value vLLM reads as a positional (the model): it must not look like a flag."""
    if value.startswith("-"):
        raise ValueError("must not begin with '-' (vLLM would read it as a flag)")
    return value
