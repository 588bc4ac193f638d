"""nanoGPT-style configuration: python config files, then --key=value overrides, checked against the defaults.

    python train.py config/tiny.py --max_iters=20 --learning_rate=3e-4

Unlike nanoGPT's exec-into-globals, a config file runs in a scratch namespace and every name it defines
must be a known setting, so a typo (`learnig_rate = 1e-3`) is an error instead of a silent no-op. Values are
type-checked against the default: an int is accepted where a float is expected, bools parse from
true/false/True/False/1/0, and a default of None accepts any type. Each error exits non-zero with one message
naming the source, key, value, expected type and a did-you-mean.
"""
import ast
import difflib
import os
import types

BOOLS = {'true': True, 'false': False, 'True': True, 'False': False, '1': True, '0': False}


def _fail(source: str, msg: str):
    raise SystemExit(f"config error ({source}): {msg}")


def _unknown(source: str, key: str, value, known) -> None:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    _fail(source, f"unknown setting '{key}' (value {value!r}){hint}")


def check_value(source: str, key: str, value, default):
    """return value coerced to the default's type, or exit with a message naming source, key and type."""
    if default is None:
        return value
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        _fail(source, f"{key} = {value!r} has type {type(value).__name__}, expected {want.__name__} "
                      f"(default {default!r})")
    return value


def parse_override(source: str, key: str, raw: str, default):
    """parse the text after '--key=' into a python value of the default's type."""
    if isinstance(default, bool):
        if raw not in BOOLS:
            _fail(source, f"{key} = {raw!r} is not a bool, expected one of true/false/True/False/1/0")
        return BOOLS[raw]
    if isinstance(default, str):
        return raw  # strings need no quotes on the command line
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None:
            return raw
        _fail(source, f"{key} = {raw!r} is not a python literal, expected {type(default).__name__} "
                      f"(default {default!r})")
    return check_value(source, key, value, default)


def configure(config: dict, argv: list[str]) -> dict:
    """apply config files and --key=value overrides from argv to config in place; return what changed."""
    changed = {}
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                _fail(arg, f"config file '{arg}' not found (settings are passed as --key=value)")
            ns: dict = {'__file__': arg}  # a config may exec another beside it, from any working directory
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, 'exec'), ns)
            except Exception as e:  # a broken config file is the user's error, not ours
                _fail(arg, f"failed to run: {type(e).__name__}: {e}")
            for key, value in ns.items():
                if key.startswith('_') or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue
                if key not in config:
                    _unknown(arg, key, value, config)
                changed[key] = config[key] = check_value(arg, key, value, config[key])
        else:
            if '=' not in arg:
                _fail('argv', f"'{arg}' must look like --key=value")
            key, raw = arg[2:].split('=', 1)
            if key not in config:
                _unknown('argv', key, raw, config)
            changed[key] = config[key] = parse_override('argv', key, raw, config[key])
    if int(os.environ.get('RANK', '0')) == 0:
        for key, value in changed.items():
            print(f"override: {key} = {value!r}")
    return changed
