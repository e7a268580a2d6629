"""The one error type of the soup engine.

`SoupError` subclasses `ValueError` so callers that already catch bad-argument errors keep working; its
message always names the offending key, source or value so a user can act on it.
"""


class SoupError(ValueError):
    """Sources, weights or outputs that cannot be souped together."""
