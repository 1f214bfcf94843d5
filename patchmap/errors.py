class UserError(Exception):
    """A mistake in the user's config, data or environment: reported as one line, never a traceback."""
