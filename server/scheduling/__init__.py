"""Scheduling: the dynamic batcher (batcher.py), between the data plane above and the backends below."""
