"""The one exception type for errors a user of mt_scale can cause (bad config, missing files)."""

from __future__ import annotations

from shard_tools.errors import UserError
from shard_tools.errors import os_error_message as os_error_message


class MtScaleError(UserError):
    """A user-fixable problem; the message names the file or setting and the fix.

    The command-line tools print it as one line on stderr and exit with status 2.
    """
