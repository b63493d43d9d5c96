"""Dataset download: real urllib code, pointed at local file:// URLs (no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from recforge.data import download as dl
from recforge.data.readers import load_raw
from recforge.errors import DataError


def make_zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A registry whose entries point at files built in tmp_path."""
    src = tmp_path / "publisher"
    src.mkdir()
    archive = make_zip(src / "ml-100k.zip", {
        "ml-100k/u.data": "1\t10\t4\t100\n2\t10\t5\t200\n1\t11\t3\t300\n",
        "ml-100k/README": "tiny",
    })
    seq = src / "Beauty.txt"
    seq.write_text("1 1 2 3\n2 2 3\n")
    entries = {
        "ml-100k": dl.RemoteDataset(url=archive.as_uri(), folder="ml-100k"),
        "beauty": dl.RemoteDataset(url=seq.as_uri(), filename="Beauty.txt",
                                   sha256=hashlib.sha256(seq.read_bytes()).hexdigest()),
        "flat": dl.RemoteDataset(url=make_zip(src / "flat.zip", {"a.csv": "user_id,item_id,timestamp\n1,2,3\n"}).as_uri()),
    }
    monkeypatch.setattr(dl, "REGISTRY", entries)
    monkeypatch.delenv("RECFORGE_DATA", raising=False)
    return {"src": src, "root": tmp_path / "datasets", "archive": archive, "seq": seq}


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_download_unzips_into_named_folder(registry):
    root = registry["root"]
    path = dl.download("ml-100k", root=root)
    assert path == root / "ml-100k"
    assert sorted(p.name for p in path.iterdir()) == ["README", "u.data"]
    assert leftovers(root) == ["ml-100k"]  # no .part file, no temporary folder
    raw = load_raw(path)
    assert raw.interactions.height == 3 and raw.name == "ml-100k"


def test_download_single_file_with_checksum(registry):
    path = dl.download("beauty", root=registry["root"])
    assert (path / "Beauty.txt").read_text() == "1 1 2 3\n2 2 3\n"
    assert load_raw(path).interactions.height == 5


def test_zip_without_top_folder_is_used_as_is(registry):
    path = dl.download("flat", root=registry["root"])
    assert (path / "a.csv").exists()


def test_existing_folder_is_reused_and_force_downloads_again(registry):
    root = registry["root"]
    first = dl.download("ml-100k", root=root)
    (first / "marker").write_text("x")
    # the publisher is gone: a present folder must not touch the network
    registry["archive"].unlink()
    assert dl.download("ml-100k", root=root) == first and (first / "marker").exists()
    with pytest.raises(DataError, match="could not download"):
        dl.download("ml-100k", root=root, force=True)
    assert (first / "marker").exists()  # a failed forced download keeps the old copy
    make_zip(registry["archive"], {"ml-100k/u.data": "5\t6\t1\t1\n"})
    again = dl.download("ml-100k", root=root, force=True)
    assert not (again / "marker").exists()
    assert (again / "u.data").read_text() == "5\t6\t1\t1\n"


def test_checksum_mismatch_leaves_nothing(registry, monkeypatch):
    root = registry["root"]
    entry = dl.REGISTRY["beauty"]
    monkeypatch.setitem(dl.REGISTRY, "beauty", dl.RemoteDataset(url=entry.url, filename="Beauty.txt", sha256="0" * 64))
    with pytest.raises(DataError, match="checksum mismatch"):
        dl.download("beauty", root=root)
    assert leftovers(root) == []


def test_unreachable_url(registry, monkeypatch):
    monkeypatch.setitem(dl.REGISTRY, "ml-100k", dl.RemoteDataset(url=(registry["src"] / "gone.zip").as_uri()))
    with pytest.raises(DataError) as e:
        dl.download("ml-100k", root=registry["root"])
    assert "could not download" in str(e.value) and "gone.zip" in str(e.value)
    assert leftovers(registry["root"]) == []


def test_archive_escaping_its_folder_is_refused(registry, monkeypatch):
    evil = make_zip(registry["src"] / "evil.zip", {"../escape.txt": "x"})
    monkeypatch.setitem(dl.REGISTRY, "ml-100k", dl.RemoteDataset(url=evil.as_uri()))
    with pytest.raises(DataError, match="outside the target folder"):
        dl.download("ml-100k", root=registry["root"])
    assert not (registry["root"].parent / "escape.txt").exists()


def test_missing_folder_inside_archive(registry, monkeypatch):
    monkeypatch.setitem(dl.REGISTRY, "ml-100k", dl.RemoteDataset(url=registry["archive"].as_uri(), folder="ml-1m"))
    with pytest.raises(DataError, match="no folder 'ml-1m'"):
        dl.download("ml-100k", root=registry["root"])


def test_resolve_dataset(registry, monkeypatch):
    root = registry["root"]
    monkeypatch.setenv("RECFORGE_DATA", str(root))
    assert dl.data_root() == root
    # an existing path wins over names
    assert dl.resolve_dataset(registry["seq"]) == registry["seq"]
    # a known name downloads once, then resolves without the network
    path = dl.resolve_dataset("ml-100k")
    assert path == root / "ml-100k" and (path / "u.data").exists()
    registry["archive"].unlink()
    assert dl.resolve_dataset("ml-100k") == path
    assert dl.resolve_dataset("movielens-100k") == path  # alias
    with pytest.raises(DataError) as e:
        dl.resolve_dataset("no-such-dataset")
    assert "unknown dataset 'no-such-dataset'" in str(e.value)
    assert "beauty, flat, ml-100k" in str(e.value)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("RECFORGE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dl.data_root() == tmp_path / ".cache" / "recforge" / "datasets"
    assert dl.data_root(tmp_path / "x") == tmp_path / "x"


def test_real_registry_entries_are_well_formed():
    reg = dl.REGISTRY
    assert {"ml-100k", "ml-1m", "ml-latest-small", "beauty"} <= set(reg)
    for name, entry in reg.items():
        assert entry.url.startswith("https://"), name
        assert entry.target
    assert reg["ml-100k"].url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert reg["beauty"].target == "Beauty.txt"
