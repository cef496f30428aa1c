"""kdcache formats."""
