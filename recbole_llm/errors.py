"""The one exception type the plugin raises for bad input.

The CLI prints its message as a single line and exits non-zero, so every message must say what is wrong and how
to fix it.
"""


class RecBoleLLMError(ValueError):
    """Bad input found before training: a missing field, path, checkpoint mismatch or malformed setting."""
