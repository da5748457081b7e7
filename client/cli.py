"""`python -m client`: call a running cnnserve server from the shell, JSON on stdout.

    python -m client classify mobilenet_v2 examples/chelsea.jpg --top-k 3
    python -m client detect shapes_detector examples/shapes.png --score-threshold 0.5 --out-image boxes.png
    python -m client segment shapes_segmenter_bilinear examples/shapes.png --out-image overlay.png --out-mask mask.png
    python -m client reconstruct fashion_mnist_autoencoder examples/chelsea.jpg --out-image recon.png
    python -m client encode fashion_mnist_encoder examples/chelsea.jpg
    python -m client health
    python -m client models
    python -m client --url host:8001 --ssl --root-cert ca.pem -H x-api-key=env:API_KEY models

Exit status: 0 when every image was answered, 2 when some images failed (their errors are in the
JSON), 1 when the request itself failed (the gRPC status is printed on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from PIL import Image

from client.channel import DEFAULT_URL, ClientTLS, InferenceServerError
from client.draw import draw_detections, overlay_mask
from client.inference import InferenceClient
from client.vision import VisionClient, failures, mask_array, png_image
from cnncore.imaging import ImageDecodeError, decode_image
from cnncore.postprocess import DEFAULT_SCORE_THRESHOLD
from cnncore.protojson import message_to_dict
from cnncore.secrets import resolve_secret


def _output_path(template: str | None, i: int, count: int) -> Path | None:
    """One image: the path as given; several: `<stem>-<i><suffix>` so no picture overwrites another."""
    if template is None:
        return None
    path = Path(template)
    return path if count == 1 else path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}")


def _source_picture(data: bytes) -> Image.Image | None:
    """The picture as the server saw it (same decoder, EXIF applied), for drawing on."""
    try:
        return decode_image(data)
    except ImageDecodeError:
        return None


def _results_json(response: Message, sources: Sequence[str]) -> dict:
    out = message_to_dict(response)
    for result, source in zip(out["results"], sources, strict=True):
        result["source"] = source
    return out


def _header(spec: str) -> tuple[str, str]:
    name, eq, raw = spec.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {name!r}")
    try:
        return name.strip().lower(), resolve_secret(raw, f"header {name}")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    """The client keyword arguments for TLS and headers the command line asked for."""
    tls = None
    if args.ssl or args.root_cert or args.client_cert or args.client_key:
        tls = ClientTLS(
            root_certificates=args.root_cert,
            private_key=args.client_key,
            certificate_chain=args.client_cert,
            target_name=args.tls_server_name,
        )
    return {"tls": tls, "headers": dict(args.header)}


def _run_vision(args: argparse.Namespace) -> tuple[dict, int]:
    images = [Path(p).read_bytes() for p in args.images]
    response: Any  # the command's response message; the code below reads what that command returns
    with VisionClient(args.url, **_connection(args)) as client:
        if args.command == "classify":
            response = client.classify(args.model, images, top_k=args.top_k, timeout=args.timeout)
        elif args.command == "detect":
            response = client.detect(
                args.model,
                images,
                score_threshold=args.score_threshold,
                max_detections=args.max_detections,
                timeout=args.timeout,
            )
        elif args.command == "segment":
            response = client.segment(args.model, images, timeout=args.timeout)
        elif args.command == "encode":
            response = client.encode(args.model, images, timeout=args.timeout)
        else:
            response = client.reconstruct(args.model, images, timeout=args.timeout)

    out = _results_json(response, args.images)
    count = len(images)
    for i, (result, entry) in enumerate(zip(response.results, out["results"], strict=True)):
        if result.image.HasField("error"):
            continue
        written: dict[str, str] = {}
        out_image = _output_path(getattr(args, "out_image", None), i, count)
        if args.command == "detect" and out_image is not None:
            picture = _source_picture(images[i])
            if picture is not None:
                draw_detections(picture, list(result.detections)).save(out_image)
                written["annotated_image"] = str(out_image)
        elif args.command == "segment":
            mask_path = _output_path(args.out_mask, i, count)
            if mask_path is not None:
                mask_path.write_bytes(result.mask_png)
                written["mask"] = str(mask_path)
            if out_image is not None:
                picture = _source_picture(images[i])
                if picture is not None:
                    overlay_mask(picture, mask_array(result)).save(out_image)
                    written["annotated_image"] = str(out_image)
        elif args.command == "reconstruct" and out_image is not None:
            png_image(result.image_png).save(out_image)
            written["reconstruction"] = str(out_image)
        if written:
            entry["files"] = written
    return out, (2 if failures(response.results) else 0)


def _run_health(args: argparse.Namespace) -> tuple[dict, int]:
    with InferenceClient(args.url, **_connection(args)) as client:
        out = {
            "live": client.is_server_live(timeout=args.timeout),
            "ready": client.is_server_ready(timeout=args.timeout),
            "health": client.health(timeout=args.timeout),
        }
    return out, 0 if out["ready"] and out["health"] == "SERVING" else 1


def _run_models(args: argparse.Namespace) -> tuple[dict, int]:
    with InferenceClient(args.url, **_connection(args)) as client:
        index = client.get_model_repository_index(timeout=args.timeout)
        models = []
        for entry in index.models:
            model: dict[str, Any] = {"name": entry.name, "version": entry.version, "state": entry.state}
            if entry.reason:
                model["reason"] = entry.reason
            if entry.state == "READY":
                meta = client.get_model_metadata(entry.name, entry.version, timeout=args.timeout)
                model["inputs"] = [message_to_dict(t) for t in meta.inputs]
                model["outputs"] = [message_to_dict(t) for t in meta.outputs]
            models.append(model)
    return {"models": models}, 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server gRPC address (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before the call gives up")
    parser.add_argument("--output", "-o", help="write the JSON here instead of stdout")
    tls = parser.add_argument_group("TLS and access keys")
    tls.add_argument("--ssl", action="store_true", help="connect over TLS (implied by the options below)")
    tls.add_argument("--root-cert", type=Path, help="PEM CA certificate that signed the server's (default: system CAs)")
    tls.add_argument("--client-cert", type=Path, help="PEM client certificate chain, for mutual TLS")
    tls.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")
    tls.add_argument("--tls-server-name", help="name to check the server certificate against, if not the URL's host")
    tls.add_argument(
        "-H",
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="send this header on every call (an access key); VALUE may be @FILE or env:VARIABLE",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def vision(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="model name in the server's repository")
        p.add_argument("images", nargs="+", help="JPEG, PNG or WebP files")
        return p

    p = vision("classify", "top-k classes per image")
    p.add_argument("--top-k", type=int, default=5)
    p = vision("detect", "boxes, labels and scores per image")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=DEFAULT_SCORE_THRESHOLD,
        help="keep detections scoring at least this (default: all the model returns)",
    )
    p.add_argument("--max-detections", type=int, default=0, help="0: all")
    p.add_argument("--out-image", help="write the picture with the boxes drawn (PNG/JPEG by suffix)")
    p = vision("segment", "class mask and per-class pixel fractions per image")
    p.add_argument("--out-image", help="write the picture with the mask blended over it")
    p.add_argument("--out-mask", help="write the class-index mask (palette PNG)")
    p = vision("reconstruct", "autoencoder reconstruction and latent vector")
    p.add_argument("--out-image", help="write the reconstructed picture (PNG)")
    vision("encode", "latent vector per image")
    sub.add_parser("health", help="liveness, readiness and the gRPC health service")
    sub.add_parser("models", help="the repository index, with inputs and outputs of ready models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("mutual TLS needs both --client-cert and --client-key")
    runner = {"health": _run_health, "models": _run_models}.get(args.command, _run_vision)
    try:
        out, status = runner(args)
    except InferenceServerError as exc:
        print(json.dumps({"error": {"code": exc.code.name, "message": exc.message}}), file=sys.stderr)
        return 1
    except OSError as exc:  # an image file that cannot be read, an output that cannot be written
        print(json.dumps({"error": {"code": "LOCAL", "message": str(exc)}}), file=sys.stderr)
        return 1
    text = json.dumps(out, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return status
