"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (missing/corrupt file, wrong key, invalid value). Message is one line."""


def error_summary(error: BaseException) -> str:
    """`Type: first line of the message` of an exception from a library, for a one-line UserError."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}{': ' + lines[0] if lines else ''}"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with one line saying what was saved and what is lost (the CLI prints `interrupted: <message>`)."""


def check_counts(*checks: tuple[str, float | None, float]) -> None:
    """(flag, value, least) each: the first value below its least (None = not given) is one line naming its flag,
    e.g. "--episodes must be >= 1; got 0"."""
    for flag, value, least in checks:
        if value is not None and not value >= least:  # `not >=` also catches NaN
            raise UserError(f"{flag} must be >= {least:g}; got {value:g}")
