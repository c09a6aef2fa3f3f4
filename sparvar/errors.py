"""The one exception type for failures a user can cause; the CLI prints it as one line."""


class SparvarError(Exception):
    """A problem with the user's input, files or environment, stated in one sentence."""
