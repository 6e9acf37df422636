"""
Config loading shared by every stage, nanoGPT-style but checked.

A stage keeps its defaults as plain globals at the top of the file and calls
    globals().update(configure(defaults, sys.argv[1:]))
Arguments are either a config file (`config/toy.py`: a few lines of python assignments) or `--key=value`
overrides, applied in the order given. Every key must exist in the defaults and every value must have the
default's type (an int is accepted where a float is expected; a default of None accepts any literal).
A mistake stops the program with one line naming the key and the closest valid keys (exit status 1).
"""
import ast
import difflib
import os
import sys


class ConfigError(SystemExit):
    """Raised (and, uncaught, printed as one line with exit status 1) for a bad config key or value."""
    def __init__(self, msg):
        super().__init__(f"config error: {msg}")


def _closest(key, valid):
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    return f" (closest valid keys: {', '.join(near)})" if near else ""


def _check(key, value, defaults, source):
    if key not in defaults:
        raise ConfigError(f"unknown key '{key}' in {source}{_closest(key, list(defaults))}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif type(value) is type(default):
        return value
    raise ConfigError(f"key '{key}' in {source} expects {type(default).__name__} "
                      f"(default {default!r}), got {type(value).__name__} {value!r}")


def _parse_value(raw):
    # python literals (3e-4, True, 'x', [1,2]); anything else is taken as a bare string (--out_dir=out/toy)
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(raw.lower(), raw)


def configure(defaults, argv):
    """Return a copy of `defaults` updated by the config files and --key=value overrides in argv."""
    config = dict(defaults)
    if any(a in ("-h", "--help") for a in argv):
        main = sys.modules["__main__"]
        print((main.__doc__ or "").strip() + "\n\nsettings (--key=value) and their defaults:")
        print("\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
        raise SystemExit(0)
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"'{arg}' needs a value: write {arg}=<value>")
            key, raw = arg[2:].split("=", 1)
            config[key] = _check(key, _parse_value(raw), config, "the command line")
        else:
            for key, value in read_file(arg).items():
                config[key] = _check(key, value, config, f"'{arg}'")
    return config


def read_file(path):
    """The settings a config file assigns (its plain top-level names)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found (profiles are in config/, e.g. config/toy.py)")
    scope = {}
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except Exception as e:
        raise ConfigError(f"config file '{path}' does not run: {type(e).__name__}: {e}")
    return {k: v for k, v in scope.items()
            if not (k.startswith("_") or callable(v) or type(v).__name__ == "module")}


def defaults_of(scope):
    """The config keys of a stage: its top-level plain values (int, float, bool, str, None), in order; UPPER_CASE
    names are constants (often imported: attack.py's END, THINK), never settings."""
    return {k: v for k, v in scope.items() if not k.startswith("_") and not k.isupper()
            and (v is None or isinstance(v, (int, float, bool, str)))}


if __name__ == "__main__":
    print(configure({"a": 1, "lr": 0.1, "name": "x"}, sys.argv[1:]))
