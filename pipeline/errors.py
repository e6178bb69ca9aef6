"""The pipeline's argument error, apart so that the Loader and the device-side finish both
raise it without importing each other."""
from __future__ import annotations

from common.errors import UserError


class LoaderError(UserError, ValueError):
    """A Loader argument is wrong; the message is one line naming it."""
