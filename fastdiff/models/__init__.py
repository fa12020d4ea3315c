"""Models built from fastdiff.nn."""
