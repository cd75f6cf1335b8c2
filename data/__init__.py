"""Data sets for the recipes. Every loader raises DataError with a one-line message."""


class DataError(Exception):
    """A data problem the user can fix; its message names the file and the fix."""
