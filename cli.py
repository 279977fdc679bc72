"""Command-line helpers shared by train.py, sample.py and the experiments: a parser whose errors are one line, the
checks of single values (each names the bad value and what was expected), and one flag per config field."""
import argparse
import dataclasses
import json

import torch

from checkpoints import as_tuples
from schedule import check_timesteps


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (exit status 2) instead of the usage block: the line itself
    names the bad value and what was expected, and --help has the rest."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def seed_value(text: str) -> int:
    """torch.Generator takes seeds in 0 … 2^64 − 1; beyond that it fails with an overflow deep in torch."""
    if not text.isdigit() or int(text) >= 2 ** 64:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from 0 to 2^64 − 1")
    return int(text)


# Far beyond any useful scale (released: 4), and finite in fp32 and bf16 times any prediction difference
# (docs/robustness.md#the-guidance-limit).
MAX_GUIDANCE = 10_000.0


def guidance_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number ≥ 0") from None
    if not 0 <= value <= MAX_GUIDANCE:
        raise argparse.ArgumentTypeError(f"{text}: expected a finite guidance scale ≥ 0 and ≤ {MAX_GUIDANCE:g} (it "
                                         f"is on for values > 1; released: 4)")
    return value


def timestep_list(text: str):
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas, descending from at most 1 "
                                         f"to at least 0, e.g. 1,0.5,0") from None
    try:
        return check_timesteps(values)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_value(text: str) -> torch.device:
    """'auto' → cuda if there is one, else cpu. A device that does not exist here fails now, in one line, rather
    than in the middle of loading the weights."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N")
    return device


# ----------------------------------------------------------------------------------------------------------------
# One flag per config field
# ----------------------------------------------------------------------------------------------------------------
def parse_value(text: str, default):
    """A flag's text as the type of the field's default: ints, floats, bools, and tuples ("32,64,64" or JSON)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        if text.strip().startswith("["):
            return as_tuples(json.loads(text))
        kind = type(default[0]) if default else int
        return tuple(parse_value(x, kind()) if kind is not bool else parse_value(x, False) for x in text.split(","))
    try:
        return type(default)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a {type(default).__name__}") from None


def field_flags(parser, group_name: str, config) -> dict:
    """One --flag per dataclass field, its default left None so that a given flag can be told apart; returns
    {dest: field name}."""
    group, dests = parser.add_argument_group(group_name), {}
    for f in dataclasses.fields(config):
        default = getattr(config, f.name)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"field_{f.name}", default=None, metavar="V",
                           type=lambda s, d=default: parse_value(s, d), help=f"(preset: {default})")
        dests[f"field_{f.name}"] = f.name
    return dests
