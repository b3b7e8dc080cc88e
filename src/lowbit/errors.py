"""The one exception type users see: a one-line message that says what is wrong and what to do."""


class LowbitError(Exception):
    """A problem with the user's input or environment (not a bug); the CLI prints it as one line."""
