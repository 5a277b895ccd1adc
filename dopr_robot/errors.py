"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (missing/corrupt file, wrong key, invalid value). Message is one line."""
