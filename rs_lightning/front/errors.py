"""The error type of the front sweep: a bad config, grid, checkpoint set or run folder, said before any point runs."""

from rs_lightning.soup.errors import SoupError


class FrontError(SoupError):
    """A sweep that cannot run or resume as asked (subclasses SoupError, hence ValueError)."""
