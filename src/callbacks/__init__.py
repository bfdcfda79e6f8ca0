"""Callbacks any method switches on from the command line (profiling, memory growth, kernel A/B, ...)."""
