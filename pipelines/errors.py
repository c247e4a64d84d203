"""The one exception type the pipelines package raises for problems a user can cause."""

from __future__ import annotations

from shard_tools.errors import UserError


class PipelineError(UserError):
    """A shard set, config or image the loaders cannot use; the message names the file and the fix."""
