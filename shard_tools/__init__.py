"""shard_tools package."""
