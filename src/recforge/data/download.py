"""Download public datasets from their original publishers into a local cache folder.

Only datasets whose terms let each user fetch them from the publisher are listed; nothing is
redistributed by RecForge. Files land in ``~/.cache/recforge/datasets/<name>/`` (the
``RECFORGE_DATA`` environment variable moves the root). A download is written to a ``.part``
file and renamed when complete, and an archive is unpacked into a temporary folder that is
renamed into place, so an interrupted download never leaves a half dataset behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from recforge.errors import DataError

CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteDataset:
    """Where a public dataset comes from and how it unpacks.

    ``filename`` is the local name of the downloaded file (default: the URL's last segment);
    ``sha256``, when set, is checked after download; ``folder`` is the folder inside a zip
    archive that holds the data (default: the archive's single top-level folder, if any).
    """

    url: str
    description: str = ""
    terms: str = ""
    filename: str | None = None
    sha256: str | None = None
    folder: str | None = None

    @property
    def target(self) -> str:
        return self.filename or self.url.rstrip("/").rsplit("/", 1)[-1]


_GROUPLENS = ("GroupLens terms: research use, no redistribution, cite the MovieLens paper "
              "(https://files.grouplens.org/datasets/movielens/)")

REGISTRY: dict[str, RemoteDataset] = {
    "ml-100k": RemoteDataset(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        description="MovieLens 100K: 100,000 ratings, 943 users, 1,682 movies, user features",
        terms=_GROUPLENS, folder="ml-100k"),
    "ml-1m": RemoteDataset(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        description="MovieLens 1M: 1,000,209 ratings, 6,040 users, 3,706 movies, user features",
        terms=_GROUPLENS, folder="ml-1m"),
    "ml-latest-small": RemoteDataset(
        url="https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
        description="MovieLens latest small: about 100,000 ratings and tags (changes between releases)",
        terms=_GROUPLENS, folder="ml-latest-small"),
    "beauty": RemoteDataset(
        # pinned to a commit so the bytes (and the checksum) cannot change under us
        url="https://raw.githubusercontent.com/salesforce/ICLRec/"
            "4afb54a036ebbf4166ed5858122d89c0642251a7/data/Beauty.txt",
        description="Amazon Beauty 5-core sequences as used by ICLRec/CoSeRec: 22,363 users, "
                    "12,101 items, 198,502 interactions",
        terms="Amazon review data (McAuley et al.), preprocessed by Salesforce ICLRec (BSD-3-Clause)",
        filename="Beauty.txt",
        sha256="226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"),
}
ALIASES = {"movielens-100k": "ml-100k", "movielens-1m": "ml-1m", "movielens-latest-small": "ml-latest-small",
           "amazon-beauty": "beauty", "Beauty": "beauty"}


def data_root(root: str | Path | None = None) -> Path:
    """Where datasets are kept: ``root``, else ``$RECFORGE_DATA``, else ``~/.cache/recforge/datasets``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("RECFORGE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recforge" / "datasets"


def known_datasets() -> list[str]:
    return sorted(REGISTRY)


def _entry(name: str) -> tuple[str, RemoteDataset]:
    key = ALIASES.get(name, name)
    if key not in REGISTRY:
        raise DataError(f"unknown dataset '{name}' (not an existing path either); known datasets: "
                        f"{', '.join(known_datasets())}, or give the path of a data file or folder")
    return key, REGISTRY[key]


def _fetch(url: str, dest: Path, label: str) -> None:
    """Stream ``url`` into ``dest`` through ``dest.part`` with a progress bar; rename when done."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            size = resp.headers.get("Content-Length")
            total = int(size) if size and size.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                      disable=None, leave=False) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        part.replace(dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"could not download {url} ({reason}); check the network connection, or "
                        f"download it by hand and give its path") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _unpack(archive: Path, into: Path, folder: str | None) -> Path:
    """Extract a zip into ``into`` (refusing paths that escape it); return the data folder."""
    try:
        with zipfile.ZipFile(archive) as zf:
            root = into.resolve()
            for member in zf.namelist():
                if not (into / member).resolve().is_relative_to(root):
                    raise DataError(f"{archive}: archive member '{member}' points outside the target folder; "
                                    "refusing to unpack it")
            zf.extractall(into)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a valid zip archive ({exc}); delete it and download again") from exc
    if folder is not None:
        if not (into / folder).is_dir():
            raise DataError(f"{archive}: no folder '{folder}' inside the archive; the publisher may have "
                            "changed it, download it by hand and give its path")
        return into / folder
    tops = [p for p in into.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else into


def download(name: str, root: str | Path | None = None, force: bool = False) -> Path:
    """Download dataset ``name`` (see :data:`REGISTRY`) and return its local folder.

    An already present folder is returned as is unless ``force`` is true. Archives are unpacked;
    a single file is placed in the folder under its target name.
    """
    key, entry = _entry(name)
    base = data_root(root)
    dest = base / key
    if dest.is_dir() and not force:
        return dest
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base, prefix=f".{key}-"))
    try:
        fetched = work / entry.target
        _fetch(entry.url, fetched, key)
        if entry.sha256 and _sha256(fetched) != entry.sha256.lower():
            raise DataError(f"{entry.url}: checksum mismatch (expected sha256 {entry.sha256}); "
                            "the file changed or the download was corrupted; try again with force")
        if zipfile.is_zipfile(fetched):
            unpacked = work / "unpacked"
            unpacked.mkdir()
            ready = _unpack(fetched, unpacked, entry.folder)
        else:
            ready = work / "file"
            ready.mkdir()
            fetched.replace(ready / entry.target)
        if dest.exists():
            shutil.rmtree(dest)
        ready.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def resolve_dataset(name_or_path: str | Path, root: str | Path | None = None) -> Path:
    """An existing path as is; a known dataset name as its local folder, downloaded if missing."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    key, _ = _entry(str(name_or_path))
    dest = data_root(root) / key
    return dest if dest.is_dir() else download(key, root=root)
