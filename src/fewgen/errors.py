"""The one exception type that means "the user asked for something that cannot be done"."""


class FewgenError(Exception):
    """A user-facing error: bad input, an impossible setting, a broken file.

    The CLI prints ``error: <message>`` on one line and exits with code 2; everything
    else is a bug and keeps its traceback. Messages name the problem and the fix.
    """
