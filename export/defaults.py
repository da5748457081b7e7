"""Export defaults, kept torch-free so `python -m export lint` and `--help` start without importing torch."""

DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3  # relative to the output's largest magnitude (see export/parity.py)
DEFAULT_REPOSITORY = "model_repository"
