"""kdcache cache_builder."""
