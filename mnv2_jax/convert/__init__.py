"""Weight import and export between our Flax model and other frameworks' files."""

from mnv2_jax.errors import UserError


class ConversionError(UserError):
    """A file cannot be converted to or from the configured model (wrong kind, names or shapes)."""
