"""Headless and multi-process runs: job files and the `labkit` command (under accelerate for several GPUs)."""
