"""Readers for the MovieLens releases (100K in GroupLens and RecBole layouts, 1M, 20M/25M CSV).

Every reader returns a :class:`RawDataset` with string ids, int64 timestamps in file order and
item text ``"<title> (<year>). Genres: <g1>, <g2>."``. Bad rows raise :class:`DataFormatError`
naming the file, the physical 1-based line and the field, unless ``skip_malformed`` is set, in
which case they are counted in ``RawDataset.skipped`` by reason and a warning is logged.
Blank lines are not rows and are ignored everywhere.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.raw_dataset import BadRow, DataFormatError, RawDataset, RowProblems

logger = logging.getLogger(__name__)

ML100K_GENRES = (
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
NO_GENRES = "(no genres listed)"
RATING_FIELDS = ("user_id", "item_id", "rating", "timestamp")

_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*$")
_INTEGER = re.compile(r"[+-]?\d+")
_RATINGS_CSV_DTYPES = {"userId": "int64", "movieId": "int64", "rating": "float64", "timestamp": "int64"}
_MOVIES_CSV_COLUMNS = ("movieId", "title", "genres")


# --------------------------------------------------------------------------- row problems


# --------------------------------------------------------------------------- low-level parsing


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataFormatError(str(path), "file not found")


def _numbered_lines(path: Path, encodings: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """Yield (1-based physical line number, text without line ending), skipping blank lines.

    Each line is decoded with the first of ``encodings`` that accepts it.
    """
    _require_file(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            yield number, _decode(path, number, raw, encodings)


def _decode(path: Path, number: int, raw: bytes, encodings: tuple[str, ...]) -> str:
    for encoding in encodings:
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise DataFormatError(str(path), f"line is not valid {' or '.join(encodings)}", line=number)


def _csv_records(path: Path) -> Generator[tuple[int, list[str]], None, None]:
    """Yield (first physical line of the record, fields) from a UTF-8 CSV file, skipping blank lines."""
    _require_file(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        previous_end = 0
        while True:
            try:
                record = next(reader, None)
            except UnicodeDecodeError as exc:
                raise DataFormatError(str(path), f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
            except csv.Error as exc:
                raise DataFormatError(str(path), f"unreadable CSV: {exc}", line=previous_end + 1) from exc
            if record is None:
                return
            start, previous_end = previous_end + 1, reader.line_num
            if record:
                yield start, record


def _check_width(fields: list[str], names: tuple[str, ...]) -> None:
    if len(fields) < len(names):
        missing = names[len(fields)]
        raise BadRow(missing, f"expected {len(names)} fields {names}, got {len(fields)} (no '{missing}')")
    if len(fields) > len(names):
        raise BadRow(names[-1], f"expected {len(names)} fields {names}, got {len(fields)}")


def _to_id(value: str, field: str) -> str:
    """An integer id in canonical decimal form ("007" -> "7")."""
    value = value.strip()
    if not _INTEGER.fullmatch(value):
        raise BadRow(field, f"expected an integer, got {value!r}")
    return str(int(value))


def _to_timestamp(value: str, field: str, allow_integral_float: bool = False) -> int:
    value = value.strip()
    if _INTEGER.fullmatch(value):
        return int(value)
    if allow_integral_float:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number.is_integer():
            return int(number)
    raise BadRow(field, f"expected an integer timestamp, got {value!r}")


def _check_rating(value: str, field: str) -> None:
    try:
        float(value)
    except ValueError:
        raise BadRow(field, f"expected a number, got {value!r}") from None


# --------------------------------------------------------------------------- shared assembly


def split_title_year(title: str) -> tuple[str, str | None]:
    """Split "Toy Story (1995)" into ("Toy Story", "1995"); a title without a year keeps None."""
    title = title.strip()
    match = _YEAR_SUFFIX.search(title)
    if match is None or match.start() == 0:
        return title, None
    return title[: match.start()], match.group(1)


def movie_text(title: str, year: str | None, genres: list[str]) -> str:
    """The item text: ``"<title> (<year>). Genres: <g1>, <g2>."`` with absent parts left out."""
    text = f"{title} ({year})." if year else f"{title}."
    if genres:
        text += f" Genres: {', '.join(genres)}."
    return text


@dataclass(frozen=True)
class _Movie:
    item_id: str
    title: str
    year: str | None
    genres: list[str]


@dataclass(frozen=True)
class _RatingLayout:
    """Where the rating fields sit in a row, and the names errors use for each column."""

    names: tuple[str, ...]
    user: int = 0
    item: int = 1
    rating: int | None = 2
    timestamp: int = 3
    float_timestamp: bool = False

    def parse(self, fields: list[str]) -> tuple[str, str, int]:
        _check_width(fields, self.names)
        user = _to_id(fields[self.user], self.names[self.user])
        item = _to_id(fields[self.item], self.names[self.item])
        if self.rating is not None:
            _check_rating(fields[self.rating], self.names[self.rating])
        ts = _to_timestamp(fields[self.timestamp], self.names[self.timestamp], self.float_timestamp)
        return user, item, ts


def _collect_movies(
    path: Path,
    rows: Iterable[tuple[int, list[str]]],
    parse: Callable[[list[str]], _Movie],
    problems: RowProblems,
) -> list[_Movie]:
    """Parse item rows in order; duplicate ids are bad rows (reason ``duplicate_item``)."""
    movies: list[_Movie] = []
    first_line: dict[str, int] = {}
    seen_rows = False
    for line, fields in rows:
        seen_rows = True
        try:
            movie = parse(fields)
            if movie.item_id in first_line:
                raise BadRow(
                    "item_id",
                    f"duplicate item id '{movie.item_id}' (first on line {first_line[movie.item_id]})",
                    reason="duplicate_item",
                )
        except BadRow as bad:
            problems.report(path, line, bad)
            continue
        first_line[movie.item_id] = line
        movies.append(movie)
    if not seen_rows:
        raise DataFormatError(str(path), "file is empty (no data rows)")
    if not movies:
        raise DataFormatError(str(path), "no usable item rows (all were skipped)")
    return movies


def _collect_ratings(
    path: Path,
    rows: Iterable[tuple[int, list[str]]],
    layout: _RatingLayout,
    known_items: set[str],
    problems: RowProblems,
) -> pd.DataFrame:
    """Parse rating rows in file order; an item id absent from the item file is a bad row."""
    users: list[str] = []
    items: list[str] = []
    stamps: list[int] = []
    seen_rows = False
    for line, fields in rows:
        seen_rows = True
        try:
            user, item, ts = layout.parse(fields)
            if item not in known_items:
                raise BadRow("item_id", f"unknown item id '{item}' (not in the item file)", "unknown_item")
        except BadRow as bad:
            problems.report(path, line, bad)
            continue
        users.append(user)
        items.append(item)
        stamps.append(ts)
    if not seen_rows:
        raise DataFormatError(str(path), "file is empty (no data rows)")
    if not users:
        raise DataFormatError(str(path), "no usable interaction rows (all were skipped)")
    return _interactions_frame(users, items, np.asarray(stamps, dtype=np.int64))


def _interactions_frame(users: list[str] | pd.Series, items: list[str] | pd.Series, stamps: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=str).reset_index(drop=True),
            "item_id": pd.Series(items, dtype=str).reset_index(drop=True),
            "timestamp": pd.Series(stamps, dtype=np.int64).reset_index(drop=True),
        }
    )


def _items_frame(movies: list[_Movie]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": pd.Series([m.item_id for m in movies], dtype=str),
            "text": pd.Series([movie_text(m.title, m.year, m.genres) for m in movies], dtype=str),
            "title": pd.Series([f"{m.title} ({m.year})" if m.year else m.title for m in movies], dtype=str),
            "categories": pd.Series([list(m.genres) for m in movies], dtype=object),
        }
    )


def _finish(name: str, interactions: pd.DataFrame, movies: list[_Movie], problems: RowProblems) -> RawDataset:
    problems.log(name)
    return RawDataset(name=name, interactions=interactions, items=_items_frame(movies), skipped=dict(problems.counts))


def _split_rows(lines: Iterable[tuple[int, str]], separator: str) -> Iterator[tuple[int, list[str]]]:
    for number, text in lines:
        yield number, text.split(separator)


def _genre_list(raw: str, separator: str) -> list[str]:
    genres = [g.strip() for g in raw.split(separator) if g.strip()]
    return [] if genres == [NO_GENRES] else genres


# --------------------------------------------------------------------------- ML-100K (GroupLens)


_U_ITEM_FIELDS = ("item_id", "title", "release_date", "video_release_date", "imdb_url", *ML100K_GENRES)


def _parse_u_item(fields: list[str]) -> _Movie:
    _check_width(fields, _U_ITEM_FIELDS)
    item_id = _to_id(fields[0], "item_id")
    title, year = split_title_year(fields[1])
    if year is None and re.fullmatch(r"\d{2}-\w{3}-\d{4}", fields[2].strip()):
        year = fields[2].strip()[-4:]
    genres = []
    for name, flag in zip(ML100K_GENRES, fields[5:]):
        if flag not in ("0", "1"):
            raise BadRow(name, f"expected a genre flag 0 or 1, got {flag!r}")
        if flag == "1":
            genres.append(name)
    return _Movie(item_id, title, year, genres)


def read_ml100k_grouplens(folder: str | Path, skip_malformed: bool = False) -> RawDataset:
    """Read ``u.data`` (tab-separated ratings) and ``u.item`` (pipe-separated, latin-1) from ``folder``."""
    folder = Path(folder)
    problems = RowProblems(skip_malformed)
    item_path = folder / "u.item"
    movies = _collect_movies(item_path, _split_rows(_numbered_lines(item_path, ("latin-1",)), "|"), _parse_u_item, problems)
    data_path = folder / "u.data"
    interactions = _collect_ratings(
        data_path,
        _split_rows(_numbered_lines(data_path, ("utf-8", "latin-1")), "\t"),
        _RatingLayout(RATING_FIELDS),
        {m.item_id for m in movies},
        problems,
    )
    return _finish("ml-100k", interactions, movies, problems)


# --------------------------------------------------------------------------- ML-100K (RecBole atomic files)


def _recbole_rows(path: Path, required: tuple[str, ...]) -> tuple[dict[str, int], tuple[str, ...], Iterator[tuple[int, list[str]]]]:
    """Read the header of a RecBole atomic file; return column positions by field name, the names, the rows."""
    lines = _numbered_lines(path, ("utf-8", "latin-1"))
    first = next(lines, None)
    if first is None:
        raise DataFormatError(str(path), "file is empty (no header)")
    header_line, header = first
    names = tuple(column.split(":", 1)[0].strip() for column in header.split("\t"))
    positions = {name: index for index, name in enumerate(names)}
    for name in required:
        if name not in positions:
            raise DataFormatError(str(path), f"header lacks required column '{name}'", line=header_line, field=name)
    return positions, names, _split_rows(lines, "\t")


def _recbole_movie_parser(positions: dict[str, int], names: tuple[str, ...]) -> Callable[[list[str]], _Movie]:
    required_width = max(positions["item_id"], positions["movie_title"]) + 1

    def parse(fields: list[str]) -> _Movie:
        if required_width <= len(fields) < len(names):
            fields = fields + [""] * (len(names) - len(fields))  # empty optional trailing fields
        _check_width(fields, names)
        item_id = _to_id(fields[positions["item_id"]], "item_id")
        title, year = split_title_year(fields[positions["movie_title"]])
        if "release_year" in positions:
            release = fields[positions["release_year"]].strip()
            if re.fullmatch(r"\d{4}", release):
                year = release
        genres = _genre_list(fields[positions["class"]], " ") if "class" in positions else []
        return _Movie(item_id, title, year, genres)

    return parse


def read_ml100k_recbole(folder: str | Path, skip_malformed: bool = False) -> RawDataset:
    """Read the RecBole atomic files ``ml-100k.inter`` and ``ml-100k.item`` from ``folder``.

    A release year that is not four digits (RecBole writes "unkonwn" for item 267) counts as absent.
    """
    folder = Path(folder)
    problems = RowProblems(skip_malformed)
    item_path = folder / "ml-100k.item"
    positions, names, rows = _recbole_rows(item_path, ("item_id", "movie_title"))
    movies = _collect_movies(item_path, rows, _recbole_movie_parser(positions, names), problems)

    inter_path = folder / "ml-100k.inter"
    positions, names, rows = _recbole_rows(inter_path, ("user_id", "item_id", "timestamp"))
    layout = _RatingLayout(
        names,
        user=positions["user_id"],
        item=positions["item_id"],
        rating=positions.get("rating"),
        timestamp=positions["timestamp"],
        float_timestamp=True,
    )
    interactions = _collect_ratings(inter_path, rows, layout, {m.item_id for m in movies}, problems)
    return _finish("ml-100k", interactions, movies, problems)


# --------------------------------------------------------------------------- ML-1M


_ML1M_MOVIE_FIELDS = ("item_id", "title", "genres")


def _parse_ml1m_movie(fields: list[str]) -> _Movie:
    _check_width(fields, _ML1M_MOVIE_FIELDS)
    title, year = split_title_year(fields[1])
    return _Movie(_to_id(fields[0], "item_id"), title, year, _genre_list(fields[2], "|"))


def read_ml1m(folder: str | Path, skip_malformed: bool = False) -> RawDataset:
    """Read ``ratings.dat`` and ``movies.dat`` ("::"-separated, latin-1) from ``folder``."""
    folder = Path(folder)
    problems = RowProblems(skip_malformed)
    movies_path = folder / "movies.dat"
    movies = _collect_movies(movies_path, _split_rows(_numbered_lines(movies_path, ("latin-1",)), "::"), _parse_ml1m_movie, problems)
    ratings_path = folder / "ratings.dat"
    interactions = _collect_ratings(
        ratings_path,
        _split_rows(_numbered_lines(ratings_path, ("latin-1",)), "::"),
        _RatingLayout(RATING_FIELDS),
        {m.item_id for m in movies},
        problems,
    )
    return _finish("ml-1m", interactions, movies, problems)


# --------------------------------------------------------------------------- ML-20M / ML-25M (CSV)


def _csv_header(path: Path, required: tuple[str, ...]) -> tuple[tuple[str, ...], Generator[tuple[int, list[str]], None, None]]:
    """Check the header of a CSV file names every required column; return the names and the data records."""
    records = _csv_records(path)
    first = next(records, None)
    if first is None:
        raise DataFormatError(str(path), "file is empty (no header)")
    line, header = first
    names = tuple(name.strip() for name in header)
    for name in required:
        if name not in names:
            raise DataFormatError(str(path), f"header lacks required column '{name}'", line=line, field=name)
    return names, records


def _parse_csv_movies(path: Path, problems: RowProblems) -> list[_Movie]:
    names, records = _csv_header(path, _MOVIES_CSV_COLUMNS)
    where = {name: names.index(name) for name in _MOVIES_CSV_COLUMNS}

    def parse(fields: list[str]) -> _Movie:
        _check_width(fields, names)
        title, year = split_title_year(fields[where["title"]])
        genres = _genre_list(fields[where["genres"]], "|")
        return _Movie(_to_id(fields[where["movieId"]], "movieId"), title, year, genres)

    return _collect_movies(path, records, parse, problems)


def _ratings_csv_fast(path: Path, header: tuple[str, ...]) -> pd.DataFrame | None:
    """Parse ratings.csv with the pandas C parser; None when any row is malformed.

    Blank lines are kept as rows (and then fail the integer check), so row ``i`` is line ``i + 2``.
    """
    if len(set(header)) != len(header):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # pandas warns before rejecting "3.5" as int64
            frame = pd.read_csv(path, engine="c", dtype=_RATINGS_CSV_DTYPES, skip_blank_lines=False, encoding="utf-8-sig")
    except (ValueError, OverflowError):  # ParserError and UnicodeDecodeError are ValueErrors
        return None
    if tuple(frame.columns) != header or frame["rating"].isna().any():
        return None  # let the row-by-row reader judge renamed columns and empty ratings
    return frame


def _ids_as_str(values: pd.Series) -> pd.Series:
    """Integer ids as decimal strings, converting each distinct id once."""
    codes, uniques = pd.factorize(values, sort=False)
    labels = pd.array([str(v) for v in uniques], dtype=str)
    return pd.Series(labels.take(codes), dtype=str)


def _ratings_from_fast_frame(path: Path, frame: pd.DataFrame, known_items: set[str], problems: RowProblems) -> pd.DataFrame:
    if frame.empty:
        raise DataFormatError(str(path), "file is empty (no data rows)")
    known = np.fromiter((int(i) for i in known_items), dtype=np.int64, count=len(known_items))
    unknown = ~frame["movieId"].isin(known).to_numpy()
    if unknown.any():
        position = int(np.flatnonzero(unknown)[0])
        bad = BadRow("item_id", f"unknown item id '{frame['movieId'].iat[position]}' (not in the item file)", "unknown_item")
        problems.report(path, position + 2, bad, count=int(unknown.sum()))
        frame = frame.loc[~unknown]
        if frame.empty:
            raise DataFormatError(str(path), "no usable interaction rows (all were skipped)")
    return _interactions_frame(_ids_as_str(frame["userId"]), _ids_as_str(frame["movieId"]), frame["timestamp"].to_numpy(np.int64))


def read_ml_csv(folder: str | Path, skip_malformed: bool = False) -> RawDataset:
    """Read ML-20M / ML-25M ``ratings.csv`` and ``movies.csv`` from ``folder``.

    Ratings go through the pandas C parser; only if that fails is the file re-read row by row to
    find (and report or skip) the first bad line.
    """
    folder = Path(folder)
    problems = RowProblems(skip_malformed)
    movies = _parse_csv_movies(folder / "movies.csv", problems)
    known_items = {m.item_id for m in movies}

    ratings_path = folder / "ratings.csv"
    header, records = _csv_header(ratings_path, tuple(_RATINGS_CSV_DTYPES))
    records.close()
    frame = _ratings_csv_fast(ratings_path, header)
    if frame is not None:
        interactions = _ratings_from_fast_frame(ratings_path, frame, known_items, problems)
    else:
        logger.info("%s: fast parse failed; re-reading row by row to locate bad lines", ratings_path)
        _, records = _csv_header(ratings_path, tuple(_RATINGS_CSV_DTYPES))
        layout = _RatingLayout(
            header,
            user=header.index("userId"),
            item=header.index("movieId"),
            rating=header.index("rating"),
            timestamp=header.index("timestamp"),
        )
        interactions = _collect_ratings(ratings_path, records, layout, known_items, problems)
    return _finish(folder.name or "movielens", interactions, movies, problems)
