"""The one exception a user can cause. The CLI prints its message in one line and exits 1."""


class MaskauditError(Exception):
    """A problem with the user's input (config, data, run directory), stated with what to do next."""
