"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a missing path, a corrupt checkpoint, an unsupported shape."""
