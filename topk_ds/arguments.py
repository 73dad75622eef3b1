"""Argument types and shared arguments of the command line. Every area's `cli.py` imports these;
the top-level `topk_ds.cli` imports the areas, and nothing imports it back."""

import argparse
import math
import re


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _whole(text: str, least: int) -> int:
    """A whole number >= least, which may be written 20e9 or 1_000_000."""
    text = text.replace("_", "")
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number (e.g. 1000000 or 20e9), got '{text}'") from None
        if not value.is_integer():  # also refuses inf and nan
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'")
        value = int(value)
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def count(text: str) -> int:
    """A whole-number argument >= 0 (20e9 style accepted)."""
    return _whole(text, 0)


def positive(text: str) -> int:
    """A whole-number argument >= 1 (20e9 style accepted)."""
    return _whole(text, 1)


def number(text: str) -> float:
    """A finite real number (nan and inf are refused: they cannot be written as JSON)."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def positive_number(text: str) -> float:
    """A finite real number > 0."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def config_args(p: argparse.ArgumentParser) -> None:
    """--config and --set, shared by every command that takes a run config."""
    p.add_argument("--config", default=None, help="a preset (tiny, paper-1024x8, paper-2048x24, each also "
                   "NAME-dense) or a YAML file; a YAML may start from a preset with `preset: NAME`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.dim=2048 (repeatable; applied last)")


def device_name(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (whether it exists here is checked by topk_ds.devices.resolve)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got '{text}'")
    return text


def device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of every command that runs a model (resolved by topk_ds.devices.resolve)."""
    p.add_argument("--device", type=device_name, default="auto",
                   help="where the model runs: auto (the first GPU if there is one, else cpu; under a launcher the "
                        "GPU of LOCAL_RANK), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="precision of the forward pass (default: bf16 on a GPU, fp32 on the CPU); statistics "
                        "are accumulated in fp32/fp64 either way")
