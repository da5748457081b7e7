"""Python client for cnnserve: the inference protocol (tensors) and the vision API (pictures).

    from client import InferenceClient, VisionClient
    with VisionClient("127.0.0.1:8001") as vision:
        print(vision.classify("mobilenet_v2", "cat.jpg", top_k=3).results[0].classes[0].label)

asyncio flavours: AsyncInferenceClient, AsyncVisionClient. The CLI is `python -m client --help`.
"""

from client.channel import ClientTLS
from client.inference import AsyncInferenceClient, InferenceClient, InferenceServerError
from client.vision import AsyncVisionClient, VisionClient, failures, mask_array, png_image

__all__ = [
    "AsyncInferenceClient",
    "AsyncVisionClient",
    "ClientTLS",
    "InferenceClient",
    "InferenceServerError",
    "VisionClient",
    "failures",
    "mask_array",
    "png_image",
]
