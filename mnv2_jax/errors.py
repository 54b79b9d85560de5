"""The base of every error caused by the user's input (config, files, flags) rather than by a bug."""


class UserError(ValueError):
    """Bad input: reported by the `mnv2` command as one line naming the field or file, exit status 2."""
