"""Benchmarks of exitnas (scripts; shared helpers in benchmarks._common)."""
