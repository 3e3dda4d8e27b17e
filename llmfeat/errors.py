"""The base class of errors caused by input or set-up: commands report them as one line, not a traceback."""


class UserError(Exception):
    """Bad input, configuration or environment; the message says what was wrong and what to do."""
