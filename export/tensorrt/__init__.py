"""TensorRT engines from the repository's ONNX models, for the GPU this runs on, by concern:

- profiles.py: optimization-profile shapes from config.pbtxt
- calibration.py: INT8 calibration samples (selection, preprocessing, batches, the calibrator)
- gpu.py: which GPU the engine is built for
- build.py: TensorRT availability and precision checks, the timing cache, one engine build
- engine_parity.py: an engine (or any backend) against ONNX Runtime
- activation.py: pointing a model's config.pbtxt at its engines
- repository_engines.py: every model of a repository, cached engines skipped, failures per model
- cli.py: the command line, `python -m export engine` (also `python -m export.tensorrt`)

TensorRT, cuda-python and a GPU are imported/probed lazily: everything up to the build itself (profile
derivation, calibration sample selection, naming) is plain Python and tested on CPU machines.
"""
