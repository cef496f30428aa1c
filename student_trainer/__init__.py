"""kdcache student_trainer."""
