"""One exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (file, argument, model). Message: what is wrong and what to do."""
