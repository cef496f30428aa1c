"""The front door: the `kdcache` command and the end-to-end demo, the only code that knows all three packages
(cache_builder writes caches through formats; student_trainer reads them through formats)."""
