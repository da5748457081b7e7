"""Export defaults, kept torch-free so `python -m export lint` and `--help` start without importing torch."""

DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4  # relative to the output's largest magnitude (see export/parity.py); observed ~1e-6
DEFAULT_REPOSITORY = "model_repository"
