"""The one exception type the plugin raises for bad input, and the one check of a setting that raises it.

The CLI prints its message as a single line and exits non-zero, so every message must say what is wrong and how
to fix it.
"""


class RecBoleLLMError(ValueError):
    """Bad input found before training: a missing field, path, checkpoint mismatch or malformed setting."""


def require(config, key, condition, requirement):
    """Refuses the setting `key` unless `condition` holds: "<key> is <value>: <requirement>", in one line."""
    if not condition:
        raise RecBoleLLMError(f"{key} is {config[key]!r}: {requirement}")


def is_int(value):
    """An integer setting, not a bool (YAML's True is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return is_int(value) or isinstance(value, float)
