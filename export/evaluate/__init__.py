"""Task metrics of exported ONNX files, measured through a serving runtime (the runtime layer's runners).

    python -m export.evaluate.detection    --onnx PATH | --repository DIR --model NAME   mAP@0.5
    python -m export.evaluate.segmentation --onnx PATH | --repository DIR --model NAME   mean IoU
    python -m export.evaluate.autoencoder  --onnx PATH [--limit N]                       reconstruction MSE

The held-out sets and the metrics themselves are the models' (models/detection/evaluate.py,
models/segmentation/evaluate.py), shared with training; this package runs them on exported files.
"""
