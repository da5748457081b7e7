"""Datasets the small models are trained and evaluated on (read from local files, never downloaded)."""
