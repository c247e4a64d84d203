"""mt_scale package."""
