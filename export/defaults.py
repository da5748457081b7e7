"""Export defaults, kept torch-free so `python -m export lint` and `--help` start without importing torch."""

DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4  # relative to the output's largest magnitude (see export/eager_parity.py); observed ~1e-6
DEFAULT_REPOSITORY = "model_repository"

# Served variant choices (export/variants.py) and the UINT8 pixel input (export/uint8_input.py).
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8")
RUNTIME_CHOICES = ("auto", "onnxruntime", "openvino")
INPUT_DTYPES = ("fp32", "uint8")
# The accuracy gate's default thresholds (export/accuracy_gate.py GateThresholds, the --gate-* flags).
GATE_ACCURACY_POINTS = 1.0  # accuracy and agreement, in percentage points
GATE_MAP50 = 0.01
GATE_MIOU = 0.01
GATE_MSE_RELATIVE = 0.10
# ImageNet classifiers (no labels offline): judged against FP32's own noise floor on held-out photos.
GATE_CONFIDENT_AGREEMENT_PCT = 99.5  # top-1 agreement on crops where FP32's top-1 p >= 0.5
GATE_CONFIDENT_P = 0.5
GATE_MEAN_KL = 0.05  # mean KL(FP32 || candidate) in nats; README "INT8 and OpenVINO" gives the measurements
