"""``--config FILE``: a sub-command's flags from a JSON or YAML file; the command line overrides it.

The file is a mapping whose keys are the sub-command's flags, spelled as on the command line or with
underscores (``max-grad-norm`` or ``max_grad_norm``), and whose values are what the flag takes (a list
for a flag that takes several values, true/false for a switch). :func:`expand_config_argument` turns
the file into command-line words placed before the user's own, so argparse does all type conversion
and choice checking, and a flag also given on the command line wins (argparse keeps the last value).
Options a recipe sets (``--recipe``) count as given when the file sets them, as on the command line.
A key that is not a flag of the sub-command is an error that names it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CONFIG_FLAG = "--config"


class ConfigFileError(ValueError):
    """The --config file cannot be read, is not a mapping, or has a key or value that is not a flag's."""


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` in the sub-command's --help (:func:`expand_config_argument` reads the file)."""
    parser.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                        help="read flags from a JSON or YAML file (keys are flag names); flags on the "
                             "command line override it; the resolved settings are saved with the run")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in ``path``: JSON for ``.json``, YAML for ``.yaml``/``.yml`` (needs PyYAML)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config: no file {p}")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigFileError(f"--config {p}: reading YAML needs PyYAML (pip install pyyaml), "
                                  "or write the file as JSON") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigFileError(f"--config {p}: not valid YAML: {exc}") from exc
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigFileError(f"--config {p}: not valid JSON: {exc}") from exc
    else:
        raise ConfigFileError(f"--config {p}: expected a .json, .yaml or .yml file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {p}: expected a mapping of flag names to values, got "
                              f"{type(data).__name__}")
    return data


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each option by its dest and by every long spelling (``--max-grad-norm`` -> ``max_grad_norm``)."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if not a.option_strings or a.dest in ("help", "config"):
            continue
        # A dest shared with hidden old spellings (flag_aliases) stays the visible option's.
        if a.help is not argparse.SUPPRESS or a.dest not in out:
            out[a.dest] = a
        for spelling in a.option_strings:
            if spelling.startswith("--") and not spelling.startswith("--no-"):
                out[spelling[2:].replace("-", "_")] = a
    return out


def _words_for(action: argparse.Action, key: str, value: Any, source: str) -> list[str]:
    flag = max(action.option_strings, key=len)  # the long spelling
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{source}: {key!r} is a switch; give true or false, got {value!r}")
        positive = [s for s in action.option_strings if not s.startswith("--no-")]
        negative = [s for s in action.option_strings if s.startswith("--no-")]
        return [max(positive, key=len)] if value else [max(negative, key=len)]
    if action.nargs == 0:  # store_true / store_false / store_const / count
        if not isinstance(value, bool):
            raise ConfigFileError(f"{source}: {key!r} is a switch; give true or false, got {value!r}")
        const_is_true = isinstance(action, argparse._StoreTrueAction)
        const_is_false = isinstance(action, argparse._StoreFalseAction)
        if value == bool(action.default) and (const_is_true or const_is_false):
            return []  # the default already
        if (value and const_is_true) or (not value and const_is_false):
            return [flag]
        raise ConfigFileError(f"{source}: {key!r} cannot be set to {value!r} (the switch {flag} only turns "
                              f"it {'on' if const_is_true else 'off'})")
    if value is None:
        raise ConfigFileError(f"{source}: {key!r} has no value (null); leave the key out for the default")
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        values = value if isinstance(value, list) else [value]
        if isinstance(action, argparse._AppendAction):
            return [w for v in values for w in (flag, _word(v))]
        return [flag, *(_word(v) for v in values)]
    if isinstance(value, (list, dict)):
        raise ConfigFileError(f"{source}: {key!r} takes one value, got {value!r}")
    return [flag, _word(value)]


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_to_argv(config: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Command-line words that set each of ``config``'s flags on ``parser``."""
    actions = _option_actions(parser)
    unknown = [k for k in config if str(k).replace("-", "_") not in actions]
    if unknown:
        known = ", ".join(sorted({max(a.option_strings, key=len).lstrip("-") for a in actions.values()
                                  if a.help is not argparse.SUPPRESS}))  # not the hidden old spellings
        raise ConfigFileError(f"{source}: {', '.join(repr(k) for k in unknown)} "
                              f"{'is not a flag' if len(unknown) == 1 else 'are not flags'} of this "
                              f"sub-command; its flags: {known}")
    words: list[str] = []
    for key, value in config.items():
        words += _words_for(actions[str(key).replace("-", "_")], str(key), value, source)
    return words


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config path or None, argv without it). ``--config=FILE`` and ``--config FILE`` both work."""
    rest: list[str] = []
    path: str | None = None
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == CONFIG_FLAG or word.startswith(CONFIG_FLAG + "="):
            if path is not None:
                raise ConfigFileError("--config given twice; merge the files into one")
            if word == CONFIG_FLAG:
                if i + 1 >= len(argv):
                    raise ConfigFileError("--config needs a file name")
                path = argv[i + 1]
                i += 2
                continue
            path = word.split("=", 1)[1]
        else:
            rest.append(word)
        i += 1
    return path, rest


def expand_config_argument(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], str | None]:
    """``argv`` (a sub-command's words, after its name) with ``--config FILE`` replaced by the file's
    flags, placed first so the command line overrides them. Returns (argv, the file's path or None)."""
    path, rest = split_config_flag(argv)
    if path is None:
        return argv, None
    config = load_config_file(path)
    return [*config_to_argv(config, parser, f"--config {path}"), *rest], str(Path(path).resolve())
