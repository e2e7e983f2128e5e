"""Dataset readers on small hand-made files: exact outputs, and errors that name file, line and field."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from datamodules.amazon_reviews import MAX_TEXT_CHARS, read_amazon_reviews
from datamodules.movielens import (
    read_ml1m,
    read_ml100k_grouplens,
    read_ml100k_recbole,
    read_ml_csv,
)
from datamodules.raw_dataset import DataFormatError, RawDataset


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def interactions(ds: RawDataset) -> list[tuple[str, str, int]]:
    return list(ds.interactions[["user_id", "item_id", "timestamp"]].itertuples(index=False, name=None))


def items(ds: RawDataset) -> list[tuple[str, str, list[str]]]:
    rows = ds.items[["item_id", "text", "categories"]].itertuples(index=False, name=None)
    return [(i, t, list(c)) for i, t, c in rows]


def assert_types(ds: RawDataset) -> None:
    assert str(ds.interactions["timestamp"].dtype) == "int64"
    for frame, col in ((ds.interactions, "user_id"), (ds.interactions, "item_id"), (ds.items, "item_id"), (ds.items, "text")):
        assert all(isinstance(v, str) for v in frame[col]), col
    assert all(isinstance(c, list) for c in ds.items["categories"])


def check_error(exc: pytest.ExceptionInfo[DataFormatError], path: Path, line: int | None, field: str | None, words: str = "") -> None:
    """The error names ``path``, ``line`` and ``field`` (as attributes and in its message) and says ``words``."""
    err = exc.value
    assert err.path == str(path)
    assert err.line == line
    assert err.field == field
    message = str(err)
    assert str(path) in message
    if line is not None:
        assert f"line {line}" in message
    if field is not None:
        assert f"'{field}'" in message
    assert words.lower() in message.lower()


# --------------------------------------------------------------------------- ML-100K GroupLens


def flags(*genres: str) -> str:
    order = (
        "unknown",
        "Action",
        "Adventure",
        "Animation",
        "Children's",
        "Comedy",
        "Crime",
        "Documentary",
        "Drama",
        "Fantasy",
        "Film-Noir",
        "Horror",
        "Musical",
        "Mystery",
        "Romance",
        "Sci-Fi",
        "Thriller",
        "War",
        "Western",
    )
    return "|".join("1" if g in genres else "0" for g in order)


CHILDRENS = "Children's"
U_ITEM = (
    "\n".join(
        [
            f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{flags('Animation', CHILDRENS, 'Comedy')}",
            f"242|Kolya (1996)|24-Jan-1997||http://x|{flags('Comedy')}",
            f"267|unknown||||{flags('unknown')}",
            f"300|Misérables, Les|01-Jan-1995||http://x|{flags()}",
            f"11|Seven (Se7en) (1995)|01-Jan-1995||http://x|{flags('Crime', 'Thriller')}",
        ]
    )
    + "\n"
)

U_DATA = "196\t242\t3\t881250949\n186\t1\t3.5\t891717742\n\n22\t267\t1\t878887116\n196\t1\t4\t881250949\n"


def ml100k(tmp_path: Path, data: str = U_DATA, item: str = U_ITEM) -> Path:
    write(tmp_path / "u.item", item, "latin-1")
    write(tmp_path / "u.data", data)
    return tmp_path


def test_ml100k_grouplens_exact(tmp_path: Path) -> None:
    ds = read_ml100k_grouplens(ml100k(tmp_path))
    assert ds.name == "ml-100k"
    assert interactions(ds) == [
        ("196", "242", 881250949),
        ("186", "1", 891717742),
        ("22", "267", 878887116),
        ("196", "1", 881250949),
    ]
    assert items(ds) == [
        ("1", "Toy Story (1995). Genres: Animation, Children's, Comedy.", ["Animation", "Children's", "Comedy"]),
        ("242", "Kolya (1996). Genres: Comedy.", ["Comedy"]),
        ("267", "unknown. Genres: unknown.", ["unknown"]),
        ("300", "Misérables, Les (1995).", []),  # year from the release date, latin-1 decoded
        ("11", "Seven (Se7en) (1995). Genres: Crime, Thriller.", ["Crime", "Thriller"]),
    ]
    assert ds.skipped == {}
    assert_types(ds)


@pytest.mark.parametrize(
    "bad_line, field, words",
    [
        ("7\t242\t3", "timestamp", "expected 4 fields"),
        ("7\t242\t3\t5\t9", "timestamp", "got 5"),
        ("7\t242\t3\t88125.5", "timestamp", "integer"),
        ("x7\t242\t3\t881250949", "user_id", "integer"),
        ("7\tabc\t3\t881250949", "item_id", "integer"),
        ("7\t242\tgood\t881250949", "rating", "number"),
        ("7\t999\t3\t881250949", "item_id", "unknown item id '999'"),
    ],
)
def test_ml100k_grouplens_bad_row_names_line_and_field(tmp_path: Path, bad_line: str, field: str, words: str) -> None:
    data = "196\t242\t3\t881250949\n\n" + bad_line + "\n186\t1\t3\t891717742\n"
    folder = ml100k(tmp_path, data=data)
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_grouplens(folder)
    check_error(exc, folder / "u.data", 3, field, words)  # the blank line 2 still counts


def test_ml100k_grouplens_item_errors(tmp_path: Path) -> None:
    folder = ml100k(tmp_path, item=U_ITEM + f"242|Kolya again (1996)|||x|{flags()}\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_grouplens(folder)
    check_error(exc, folder / "u.item", 6, "item_id", "duplicate item id '242' (first on line 2)")

    folder = ml100k(tmp_path, item=U_ITEM.replace("|24-Jan-1997||http://x|0", "|24-Jan-1997||http://x|2"))
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_grouplens(folder)
    check_error(exc, folder / "u.item", 2, "unknown", "genre flag")

    folder = ml100k(tmp_path, item="5|Short (1995)|01-Jan-1995\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_grouplens(folder)
    check_error(exc, folder / "u.item", 1, "video_release_date", "expected 24 fields")


def test_ml100k_grouplens_missing_and_empty_files(tmp_path: Path) -> None:
    write(tmp_path / "u.item", U_ITEM, "latin-1")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_grouplens(tmp_path)
    check_error(exc, tmp_path / "u.data", None, None, "not found")

    write(tmp_path / "u.data", "\n\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_grouplens(tmp_path)
    check_error(exc, tmp_path / "u.data", None, None, "empty")

    write(tmp_path / "u.item", "")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_grouplens(tmp_path)
    check_error(exc, tmp_path / "u.item", None, None, "empty")


def test_ml100k_grouplens_skip_malformed_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = "196\t242\t3\t881250949\nbad line\n7\t999\t3\t5\n186\t1\t3\tnever\n22\t267\t1\t878887116\n"
    item = U_ITEM + f"oops|Broken (1990)|||x|{flags()}\n1|Toy Story again (1995)|||x|{flags()}\n"
    with caplog.at_level(logging.WARNING, logger="datamodules.movielens"):
        ds = read_ml100k_grouplens(ml100k(tmp_path, data=data, item=item), skip_malformed=True)
    assert interactions(ds) == [("196", "242", 881250949), ("22", "267", 878887116)]
    assert [i for i, _, _ in items(ds)] == ["1", "242", "267", "300", "11"]
    assert ds.items["text"].iloc[0].startswith("Toy Story (1995)")  # the first of a duplicate pair wins
    assert ds.skipped == {"malformed": 3, "unknown_item": 1, "duplicate_item": 1}
    text = caplog.text
    assert "skipped 3 malformed" in text and "skipped 1 unknown_item" in text and "skipped 1 duplicate_item" in text
    assert "u.item, line 6" in text and "u.data, line 3" in text  # the first skipped row of each reason


def test_skip_malformed_still_fails_when_nothing_is_left(tmp_path: Path) -> None:
    folder = ml100k(tmp_path, data="1\t2\n3\t4\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_grouplens(folder, skip_malformed=True)
    check_error(exc, folder / "u.data", None, None, "no usable")


# --------------------------------------------------------------------------- ML-100K RecBole


RB_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "267\tunkonwn\tunkonwn\tunknown\n"
    "5\tNo Class\t1994\t\n"
    "6\tNo Year Or Class\n"
    "7\tMisérables, Les\t\tDrama\n"
)
RB_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t267\t3\t881250949\n186\t1\t3\t891717742.0\n186\t7\t5\t891717000\n"


def recbole(tmp_path: Path, inter: str = RB_INTER, item: str = RB_ITEM) -> Path:
    write(tmp_path / "ml-100k.item", item)
    write(tmp_path / "ml-100k.inter", inter)
    return tmp_path


def test_ml100k_recbole_exact(tmp_path: Path) -> None:
    ds = read_ml100k_recbole(recbole(tmp_path))
    assert interactions(ds) == [("196", "267", 881250949), ("186", "1", 891717742), ("186", "7", 891717000)]
    assert items(ds) == [
        ("1", "Toy Story (1995). Genres: Animation, Children's, Comedy.", ["Animation", "Children's", "Comedy"]),
        ("267", "unkonwn. Genres: unknown.", ["unknown"]),
        ("5", "No Class (1994).", []),
        ("6", "No Year Or Class.", []),
        ("7", "Misérables, Les. Genres: Drama.", ["Drama"]),
    ]
    assert_types(ds)


def test_ml100k_recbole_latin1_item_file_and_column_order(tmp_path: Path) -> None:
    item = "class:token_seq\titem_id:token\tmovie_title:token_seq\nDrama\t7\tMisérables, Les (1995)\n"
    inter = "timestamp:float\titem_id:token\tuser_id:token\n10\t7\t1\n"
    write(tmp_path / "ml-100k.item", item, "latin-1")
    write(tmp_path / "ml-100k.inter", inter)
    ds = read_ml100k_recbole(tmp_path)
    assert interactions(ds) == [("1", "7", 10)]
    assert items(ds) == [("7", "Misérables, Les (1995). Genres: Drama.", ["Drama"])]


def test_ml100k_recbole_errors_count_the_header_line(tmp_path: Path) -> None:
    folder = recbole(tmp_path, inter=RB_INTER + "5\t1\t3\t12.5\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_recbole(folder)
    check_error(exc, folder / "ml-100k.inter", 5, "timestamp", "integer")

    folder = recbole(tmp_path, inter=RB_INTER.replace("186\t7", "186\t8"))
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_recbole(folder)
    check_error(exc, folder / "ml-100k.inter", 4, "item_id", "unknown item id '8'")

    folder = recbole(tmp_path, inter="user_id:token\titem_id:token\trating:float\n1\t1\t3\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_recbole(folder)
    check_error(exc, folder / "ml-100k.inter", 1, "timestamp", "lacks required column")

    folder = recbole(tmp_path, inter=RB_INTER.splitlines()[0] + "\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_recbole(folder)
    check_error(exc, folder / "ml-100k.inter", None, None, "empty")

    folder = recbole(tmp_path, item=RB_ITEM + "x9\tBad Id\t1990\tDrama\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k_recbole(folder)
    check_error(exc, folder / "ml-100k.item", 7, "item_id", "integer")


# --------------------------------------------------------------------------- ML-1M


ML1M_MOVIES = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
    "3883::Misérables, Les (1995)::(no genres listed)\n"
    "4000::Untitled Project::Drama\n"
)
ML1M_RATINGS = "1::2::5::978300760\n6040::1::3::956703932\n1::4000::4::978302109\n"


def test_ml1m_exact(tmp_path: Path) -> None:
    write(tmp_path / "movies.dat", ML1M_MOVIES, "latin-1")
    write(tmp_path / "ratings.dat", ML1M_RATINGS)
    ds = read_ml1m(tmp_path)
    assert ds.name == "ml-1m"
    assert interactions(ds) == [("1", "2", 978300760), ("6040", "1", 956703932), ("1", "4000", 978302109)]
    assert items(ds) == [
        ("1", "Toy Story (1995). Genres: Animation, Children's, Comedy.", ["Animation", "Children's", "Comedy"]),
        ("2", "Jumanji (1995). Genres: Adventure, Children's, Fantasy.", ["Adventure", "Children's", "Fantasy"]),
        ("3883", "Misérables, Les (1995).", []),
        ("4000", "Untitled Project. Genres: Drama.", ["Drama"]),
    ]
    assert_types(ds)


def test_ml1m_errors(tmp_path: Path) -> None:
    write(tmp_path / "movies.dat", ML1M_MOVIES, "latin-1")
    write(tmp_path / "ratings.dat", ML1M_RATINGS + "5::1::3\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml1m(tmp_path)
    check_error(exc, tmp_path / "ratings.dat", 4, "timestamp", "expected 4 fields")

    write(tmp_path / "movies.dat", ML1M_MOVIES + "1::Toy Story 2 (1999)::Comedy\n", "latin-1")
    with pytest.raises(DataFormatError) as exc:
        read_ml1m(tmp_path)
    check_error(exc, tmp_path / "movies.dat", 5, "item_id", "duplicate")

    write(tmp_path / "movies.dat", "12::Only a title\n", "latin-1")
    with pytest.raises(DataFormatError) as exc:
        read_ml1m(tmp_path)
    check_error(exc, tmp_path / "movies.dat", 1, "genres", "expected 3 fields")


# --------------------------------------------------------------------------- ML-20M / ML-25M CSV


MOVIES_CSV = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '11,"American President, The (1995)",Comedy|Drama|Romance\n'
    "131260,Rentun Ruusu (2001),(no genres listed)\n"
    "149532,Babylon 5,Sci-Fi\n"
    '200,"Quote ""Inside"" (1999) ",Drama\n'
)
RATINGS_CSV = "userId,movieId,rating,timestamp\n1,11,4.0,1112486027\n1,1,3.5,1112484676\n2,149532,5.0,974820889\n1,131260,0.5,1112484580\n"


def ml_csv(tmp_path: Path, ratings: str = RATINGS_CSV, movies: str = MOVIES_CSV) -> Path:
    folder = tmp_path / "ml-25m"
    write(folder / "movies.csv", movies)
    write(folder / "ratings.csv", ratings)
    return folder


def test_ml_csv_exact(tmp_path: Path) -> None:
    ds = read_ml_csv(ml_csv(tmp_path))
    assert ds.name == "ml-25m"
    assert interactions(ds) == [
        ("1", "11", 1112486027),
        ("1", "1", 1112484676),
        ("2", "149532", 974820889),
        ("1", "131260", 1112484580),
    ]
    assert items(ds) == [
        ("1", "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy.", ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]),
        ("11", "American President, The (1995). Genres: Comedy, Drama, Romance.", ["Comedy", "Drama", "Romance"]),
        ("131260", "Rentun Ruusu (2001).", []),
        ("149532", "Babylon 5. Genres: Sci-Fi.", ["Sci-Fi"]),
        ("200", 'Quote "Inside" (1999). Genres: Drama.', ["Drama"]),
    ]
    assert ds.skipped == {}
    assert_types(ds)


@pytest.mark.parametrize(
    "bad_line, field, words",
    [
        ("3,1,4.0,12x", "timestamp", "integer"),
        ("3,1,4.0,1.5", "timestamp", "integer"),
        ("3,1,4.0", "timestamp", "expected 4 fields"),
        ("3,1,4.0,100,7", "timestamp", "got 5"),
        ("3.5,1,4.0,100", "userId", "integer"),
        ("3,,4.0,100", "movieId", "integer"),
        ("3,1,,100", "rating", "number"),
        ("3,77,4.0,100", "item_id", "unknown item id '77'"),
    ],
)
def test_ml_csv_reports_first_bad_line(tmp_path: Path, bad_line: str, field: str, words: str) -> None:
    ratings = RATINGS_CSV + "\n" + bad_line + "\n2,1,1.0,50\n" + bad_line + "\n"
    folder = ml_csv(tmp_path, ratings=ratings)
    with pytest.raises(DataFormatError) as exc:
        read_ml_csv(folder)
    check_error(exc, folder / "ratings.csv", 7, field, words)  # header + 4 rows + blank line


def test_ml_csv_skip_malformed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # unknown items only: the fast path drops them; with a malformed row the row-by-row path does it
    folder = ml_csv(tmp_path, ratings=RATINGS_CSV + "3,77,4.0,100\n3,78,4.0,100\n")
    with caplog.at_level(logging.WARNING, logger="datamodules.movielens"):
        ds = read_ml_csv(folder, skip_malformed=True)
    assert len(ds.interactions) == 4 and ds.skipped == {"unknown_item": 2}
    assert "skipped 2 unknown_item" in caplog.text and "line 6" in caplog.text

    folder = ml_csv(tmp_path, ratings=RATINGS_CSV + "3,77,4.0,100\n3,1,4.0,oops\n4,1,2.0,99\n")
    ds = read_ml_csv(folder, skip_malformed=True)
    assert interactions(ds)[-1] == ("4", "1", 99)
    assert ds.skipped == {"unknown_item": 1, "malformed": 1}


def test_ml_csv_header_and_file_errors(tmp_path: Path) -> None:
    folder = ml_csv(tmp_path, ratings="userId,movieId,rating,time\n1,1,4.0,5\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml_csv(folder)
    check_error(exc, folder / "ratings.csv", 1, "timestamp", "lacks required column")

    folder = ml_csv(tmp_path, movies="movieId,name,genres\n1,Toy Story (1995),Comedy\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml_csv(folder)
    check_error(exc, folder / "movies.csv", 1, "title", "lacks required column")

    folder = ml_csv(tmp_path, ratings="userId,movieId,rating,timestamp\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml_csv(folder)
    check_error(exc, folder / "ratings.csv", None, None, "empty")

    folder = ml_csv(tmp_path, ratings="")
    with pytest.raises(DataFormatError) as exc:
        read_ml_csv(folder)
    check_error(exc, folder / "ratings.csv", None, None, "empty")

    folder = ml_csv(tmp_path, movies=MOVIES_CSV + '7,"Bad, Id (1990)",Drama\n1,Toy Story (1995),Comedy\n')
    with pytest.raises(DataFormatError) as exc:
        read_ml_csv(folder)
    check_error(exc, folder / "movies.csv", 8, "item_id", "duplicate")

    with pytest.raises(DataFormatError) as exc:
        read_ml_csv(tmp_path / "nowhere")
    check_error(exc, tmp_path / "nowhere" / "movies.csv", None, None, "not found")


# --------------------------------------------------------------------------- Amazon Reviews


def jsonl(path: Path, rows: list[dict | str]) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
        return path
    return write(path, text)


META_2018 = [
    {"asin": "B001", "title": "Gentle Soap &amp; Bar", "category": ["Beauty", "Skin Care", "Soaps"], "brand": "Acme", "description": ["Nice soap."]},
    {"asin": "B002", "title": "Comb", "category": [], "description": "A comb."},
    {"asin": "B003", "category": ["Beauty"], "brand": "", "description": ["Only a description."]},
]
REVIEWS_2018 = [
    {"reviewerID": "A2", "asin": "B002", "overall": 5.0, "unixReviewTime": 1400000000, "reviewText": "ok"},
    {"reviewerID": "A1", "asin": "B001", "overall": 2.0, "unixReviewTime": 1300000000},
    {"reviewerID": "A1", "asin": "B003", "overall": 4.0, "unixReviewTime": 1300000001},
]


def test_amazon_2018_exact(tmp_path: Path) -> None:
    reviews = jsonl(tmp_path / "All_Beauty.json", REVIEWS_2018)
    meta = jsonl(tmp_path / "meta_All_Beauty.json", META_2018)
    ds = read_amazon_reviews(reviews, meta)
    assert ds.name == "amazon2018-All_Beauty"
    assert interactions(ds) == [("A2", "B002", 1400000000), ("A1", "B001", 1300000000), ("A1", "B003", 1300000001)]
    assert items(ds) == [
        ("B001", "Gentle Soap & Bar. Category: Beauty > Skin Care > Soaps. Brand: Acme.", ["Beauty", "Skin Care", "Soaps"]),
        ("B002", "Comb.", []),
        ("B003", "Only a description.. Category: Beauty.", ["Beauty"]),
    ]
    assert ds.skipped == {}
    assert_types(ds)


META_2023 = [
    {
        "parent_asin": "P1",
        "title": "Lipstick",
        "main_category": "All Beauty",
        "categories": [],
        "features": ["red"],
        "description": [],
        "store": "Glam",
        "details": {},
    },
    {
        "parent_asin": "P2",
        "title": "Brush",
        "main_category": None,
        "categories": ["Beauty", "Tools"],
        "features": [],
        "description": ["A brush."],
        "store": "Other",
        "details": {"Brand": "BrushCo"},
    },
    {"parent_asin": "P3", "title": "x" * 600, "main_category": "All Beauty", "categories": [], "features": [], "description": []},
]
REVIEWS_2023 = [
    {"rating": 5.0, "title": "t", "text": "t", "asin": "C1", "parent_asin": "P2", "user_id": "U1", "timestamp": 1588687728923, "verified_purchase": True},
    {"rating": 1.0, "asin": "C9", "parent_asin": "P1", "user_id": "U2", "timestamp": 1588615855070},
    {"rating": 4.0, "asin": "C3", "parent_asin": "P3", "user_id": "U1", "timestamp": 1588687729999},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_amazon_2023_exact(tmp_path: Path, suffix: str) -> None:
    reviews = jsonl(tmp_path / f"All_Beauty{suffix}", REVIEWS_2023)
    meta = jsonl(tmp_path / f"meta_All_Beauty{suffix}", META_2023)
    ds = read_amazon_reviews(reviews, meta)
    assert ds.name == "amazon2023-All_Beauty"
    assert interactions(ds) == [("U1", "P2", 1588687728), ("U2", "P1", 1588615855), ("U1", "P3", 1588687729)]
    got = items(ds)
    assert got[:2] == [
        ("P1", "Lipstick. Category: All Beauty. Brand: Glam.", ["All Beauty"]),
        ("P2", "Brush. Category: Beauty > Tools. Brand: BrushCo.", ["Beauty", "Tools"]),
    ]
    assert got[2][0] == "P3" and got[2][2] == ["All Beauty"]
    assert len(got[2][1]) == MAX_TEXT_CHARS and got[2][1] == "x" * (MAX_TEXT_CHARS - 1) + "…"
    assert_types(ds)


def test_amazon_explicit_version_and_min_rating(tmp_path: Path) -> None:
    reviews = jsonl(tmp_path / "r.jsonl", REVIEWS_2023)
    meta = jsonl(tmp_path / "m.jsonl", META_2023)
    ds = read_amazon_reviews(reviews, meta, version="2023", min_rating=4.0)
    assert interactions(ds) == [("U1", "P2", 1588687728), ("U1", "P3", 1588687729)]
    assert ds.skipped == {"below_min_rating": 1}
    assert len(ds.items) == 3  # items are kept whether or not anyone reviewed them

    with pytest.raises(DataFormatError) as exc:  # 2023 files read as 2018 lack the 2018 keys
        read_amazon_reviews(reviews, meta, version="2018")
    check_error(exc, meta, 1, "asin", "missing required key 'asin'")

    with pytest.raises(ValueError, match="version"):
        read_amazon_reviews(reviews, meta, version="2014")


@pytest.mark.parametrize(
    "bad_row, field, words",
    [
        ("{not json", None, "invalid JSON"),
        ("[1, 2]", None, "JSON object"),
        ({"reviewerID": "A9", "overall": 1.0, "unixReviewTime": 5}, "asin", "missing required key 'asin'"),
        ({"reviewerID": "A9", "asin": "B001", "overall": 1.0}, "unixReviewTime", "missing required key"),
        ({"reviewerID": "A9", "asin": "B001", "overall": 1.0, "unixReviewTime": "soon"}, "unixReviewTime", "integer"),
        ({"reviewerID": 7, "asin": "B001", "overall": 1.0, "unixReviewTime": 5}, "reviewerID", "string"),
        ({"reviewerID": "A9", "asin": "B001", "overall": "five", "unixReviewTime": 5}, "overall", "number"),
        ({"reviewerID": "A9", "asin": "B404", "overall": 1.0, "unixReviewTime": 5}, "item_id", "unknown item id 'B404'"),
    ],
)
def test_amazon_bad_review_names_line_and_field(tmp_path: Path, bad_row: dict | str, field: str | None, words: str) -> None:
    reviews = jsonl(tmp_path / "r.json.gz", [*REVIEWS_2018[:2], "", bad_row, REVIEWS_2018[2]])
    meta = jsonl(tmp_path / "m.json", META_2018)
    with pytest.raises(DataFormatError) as exc:
        read_amazon_reviews(reviews, meta)
    check_error(exc, reviews, 4, field, words)


def test_amazon_metadata_errors(tmp_path: Path) -> None:
    reviews = jsonl(tmp_path / "r.json", REVIEWS_2018)
    meta = jsonl(tmp_path / "m.json", [*META_2018, {"asin": "B002", "title": "Comb again"}])
    with pytest.raises(DataFormatError) as exc:
        read_amazon_reviews(reviews, meta)
    check_error(exc, meta, 4, "asin", "duplicate item id 'B002' (first on line 2)")

    meta = jsonl(tmp_path / "m.json", [META_2018[0], {"asin": "B002", "category": "Beauty"}])
    with pytest.raises(DataFormatError) as exc:
        read_amazon_reviews(reviews, meta)
    check_error(exc, meta, 2, "category", "list of strings")

    meta = jsonl(tmp_path / "m.json", [])
    with pytest.raises(DataFormatError) as exc:
        read_amazon_reviews(reviews, meta)
    check_error(exc, meta, None, None, "empty")

    with pytest.raises(DataFormatError) as exc:
        read_amazon_reviews(reviews, tmp_path / "missing.json")
    check_error(exc, tmp_path / "missing.json", None, None, "not found")


def test_amazon_review_file_errors(tmp_path: Path) -> None:
    meta = jsonl(tmp_path / "m.json", META_2018)
    with pytest.raises(DataFormatError) as exc:
        read_amazon_reviews(tmp_path / "none.json", meta)
    check_error(exc, tmp_path / "none.json", None, None, "not found")

    empty = jsonl(tmp_path / "empty.json", ["", ""])
    with pytest.raises(DataFormatError) as exc:
        read_amazon_reviews(empty, meta)
    check_error(exc, empty, None, None, "empty")

    odd = jsonl(tmp_path / "odd.json", [{"who": "A1", "what": "B001"}])
    with pytest.raises(DataFormatError) as exc:
        read_amazon_reviews(odd, meta)
    check_error(exc, odd, 1, None, "cannot tell the release")

    broken = jsonl(tmp_path / "broken.json", ["{oops", REVIEWS_2018[0]])
    with pytest.raises(DataFormatError) as exc:  # auto-detection reports the bad first line too
        read_amazon_reviews(broken, meta)
    check_error(exc, broken, 1, None, "invalid JSON")


def test_amazon_skip_malformed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reviews = jsonl(
        tmp_path / "r.json",
        [
            "{oops",  # skipped, and auto-detection looks past it
            REVIEWS_2018[0],
            {"reviewerID": "A9", "asin": "B404", "overall": 1.0, "unixReviewTime": 5},
            {"reviewerID": "A9", "asin": "B001"},
            REVIEWS_2018[1],
        ],
    )
    meta = jsonl(tmp_path / "m.json", [*META_2018, {"asin": "B001", "title": "dup"}, {"title": "no asin"}])
    with caplog.at_level(logging.WARNING, logger="datamodules.amazon_reviews"):
        ds = read_amazon_reviews(reviews, meta, skip_malformed=True)
    assert interactions(ds) == [("A2", "B002", 1400000000), ("A1", "B001", 1300000000)]
    assert ds.skipped == {"duplicate_item": 1, "malformed": 3, "unknown_item": 1}
    assert ds.items["text"].iloc[0].startswith("Gentle Soap")
    assert "skipped 3 malformed" in caplog.text and "skipped 1 unknown_item" in caplog.text
