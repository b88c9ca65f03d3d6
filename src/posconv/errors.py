"""The one error type a user can cause: a bad param or a bad input file."""


class BadInput(Exception):
    """A bad param or input file. Stages exit 2 and print this one-line message."""
