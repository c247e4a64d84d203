"""The one exception type for errors a user of mt_scale can cause (bad config, missing files)."""


class MtScaleError(Exception):
    """A user-fixable problem; the message names the file or setting and the fix.

    The command-line tools print it as one line on stderr and exit with status 2.
    """
