"""The command line of every script: typed --key=value overrides of dataclass fields, and the device choice.

    @dataclass
    class Config:
        lr: float = opt(3e-4, "AdamW learning rate")
    overrides = parse(sys.argv[1:], [Config], __doc__)     # {"lr": 0.001} for --lr=1e-3
    cfg = Config(**overrides)

Each field's type is its default's type: int, float, str, bool or a tuple ("3,4"; one value fills a pair).
Accepted forms: --key=value, --key value, a bare --flag for a bool, --key v1 v2 for a tuple; "-" and "_" are
the same in a key. --help prints the script's usage paragraph and every field with its default and help text.
Bad input raises ValueError with one line that names the option and what was expected.
"""
import dataclasses
import difflib
import os
import sys

import torch


def opt(default, help):
    """A dataclass field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def show(value):
    """A value the way it is typed on the command line: 3,4 for a tuple, plain text otherwise."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_value(key, text, default):
    """Parse text into the type of default; ValueError naming the key and the expected type."""
    try:
        if isinstance(default, bool):  # before int: bool is an int subclass
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, tuple):  # "3,4" -> (3, 4); a single value fills a pair: "3" -> (3, 3)
            kind = type(default[0]) if default else str
            items = tuple(kind(x) for x in text.split(",") if x)
            return items * 2 if len(items) == 1 and len(default) == 2 else items
        return type(default)(text)
    except ValueError:
        kind = f"a comma-separated list like {show(default) or 'a,b'}" if isinstance(default, tuple) \
            else type(default).__name__
        raise ValueError(f"--{key}={text}: expected {kind} (the default is {default!r})") from None


def parse(argv, classes, usage, notes=""):
    """argv -> {field name: typed value} over the fields of the given dataclasses (names must be unique)."""
    defaults = {f.name: f.default for cls in classes for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        print(usage.strip() + "\n\nOptions:")
        for f in (f for cls in classes for f in dataclasses.fields(cls)):
            print(f"  {'--' + f.name + '=' + show(f.default):<32} {f.metadata.get('help', '')}")
        if notes:
            print("\n" + notes.strip())
        raise SystemExit(0)
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        key, has_value, text = arg.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--"):
            raise ValueError(f"expected --key=value, got {arg!r} (see --help)")
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=3)
            raise ValueError(f"unknown option --{key}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                          if close else "; see --help for the list"))
        i += 1
        if not has_value:  # --flag, --key value, or --key v1 v2 ... for a tuple
            values = []
            while i < len(argv) and not argv[i].startswith("--") and not isinstance(defaults[key], bool) \
                    and (isinstance(defaults[key], tuple) or not values):
                values.append(argv[i])
                i += 1
            if not values and not isinstance(defaults[key], bool):
                raise ValueError(f"--{key} needs a value: --{key}=VALUE")
            text = ",".join(values) if values else "true"
        overrides[key] = parse_value(key, text, defaults[key])
    return overrides


def run_script(main):
    """Run a script's main(); when the reader of stdout goes away (python train.py --help | head), exit quietly
    with the shell's code for SIGPIPE instead of a BrokenPipeError traceback."""
    try:
        try:
            main()
        finally:
            sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at interpreter exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush fails silently
        raise SystemExit(141) from None


def pick_device(name):
    """auto -> cuda if present, else Apple's mps, else cpu; an explicit name (cpu, cuda, cuda:N, mps) is checked
    against what this machine has. ValueError for one it lacks."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device={name}: expected auto, cpu, cuda, cuda:N or mps") from None
        kind = device.type
        if kind not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device={name}: expected auto, cpu, cuda, cuda:N or mps")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device={name}: this torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                             f"use --device=cpu, or install a CUDA build of torch")
        if kind == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device={name}: Apple's MPS is not available here; use --device=cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
