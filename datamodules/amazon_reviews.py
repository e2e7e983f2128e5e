"""Reader for Amazon Reviews 2018 and 2023 (JSON lines, plain or gzip-compressed).

2018: reviews carry ``reviewerID, asin, overall, unixReviewTime`` (seconds); metadata is keyed
by ``asin`` with ``title, category, brand, description``.
2023: reviews carry ``user_id, parent_asin, asin, rating, timestamp`` (milliseconds); metadata is
keyed by ``parent_asin`` with ``title, main_category, categories, features, description``
(``details["Brand"]`` or ``store`` stands in for the brand).

Bad rows raise :class:`DataFormatError` naming the file, the physical 1-based line and the key,
unless ``skip_malformed`` is set, in which case they are counted in ``RawDataset.skipped`` by
reason and a warning is logged. Blank lines are not rows and are ignored.
"""

from __future__ import annotations

import gzip
import html
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datamodules.raw_dataset import BadRow, DataFormatError, RawDataset, RowProblems

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 512
VERSIONS = ("auto", "2018", "2023")


@dataclass(frozen=True)
class _Schema:
    """Key names and timestamp unit of one release."""

    version: str
    user_key: str
    item_key: str
    rating_key: str
    time_key: str
    time_per_second: int
    meta_item_key: str


_SCHEMAS = {
    "2018": _Schema("2018", "reviewerID", "asin", "overall", "unixReviewTime", 1, "asin"),
    "2023": _Schema("2023", "user_id", "parent_asin", "rating", "timestamp", 1000, "parent_asin"),
}


# --------------------------------------------------------------------------- row problems


# --------------------------------------------------------------------------- JSON lines


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """Yield (1-based physical line, parsed object or the reason it is unusable); blank lines are skipped."""
    if not path.is_file():
        raise DataFormatError(str(path), "file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    value = json.loads(raw)
                except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                    yield number, BadRow(None, f"invalid JSON: {exc}")
                    continue
                if not isinstance(value, dict):
                    yield number, BadRow(None, f"expected a JSON object, got {type(value).__name__}")
                    continue
                yield number, value
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(str(path), f"unreadable file: {exc}") from exc


def _detect_version(path: Path, skip_malformed: bool) -> str:
    """The release whose review keys the first JSON object in ``path`` has."""
    for line, row in _json_lines(path):
        if isinstance(row, BadRow):
            if skip_malformed:
                continue  # counted by the main pass
            raise DataFormatError(str(path), row.message, line=line, field=row.field)
        if "reviewerID" in row:
            return "2018"
        if "user_id" in row:
            return "2023"
        raise DataFormatError(
            str(path),
            f"cannot tell the release from keys {sorted(row)}; pass version='2018' or '2023'",
            line=line,
        )
    raise DataFormatError(str(path), "file is empty (no data rows)")


# --------------------------------------------------------------------------- field checks


def _required_str(row: dict[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        raise BadRow(key, f"missing required key '{key}'")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise BadRow(key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _timestamp(row: dict[str, Any], key: str) -> int:
    if key not in row or row[key] is None:
        raise BadRow(key, f"missing required key '{key}'")
    value = row[key]
    if isinstance(value, bool):
        raise BadRow(key, f"expected an integer timestamp, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise BadRow(key, f"expected an integer timestamp, got {value!r}")


def _rating(row: dict[str, Any], key: str, required: bool) -> float | None:
    value = row.get(key)
    if value is None:
        if required:
            raise BadRow(key, f"missing required key '{key}' (min_rating is set)")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRow(key, f"expected a number, got {value!r}")
    return float(value)


def _clean(value: Any, key: str) -> str:
    """Optional text: None -> "", entities unescaped, whitespace collapsed."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(key, f"expected a string, got {type(value).__name__}")
    return " ".join(html.unescape(value).split())


def _string_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRow(key, "expected a list of strings")
    return [c for c in (_clean(v, key) for v in value) if c]


def _description(value: Any) -> str:
    """Description as one string (a list is joined); anything else counts as absent."""
    if isinstance(value, list):
        value = " ".join(v for v in value if isinstance(v, str))
    return " ".join(html.unescape(value).split()) if isinstance(value, str) else ""


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class _Product:
    item_id: str
    title: str
    categories: list[str]
    brand: str
    description: str


def _parse_product(row: dict[str, Any], schema: _Schema) -> _Product:
    item_id = _required_str(row, schema.meta_item_key)
    title = _clean(row.get("title"), "title")
    if schema.version == "2018":
        categories = _string_list(row.get("category"), "category")
        brand = _clean(row.get("brand"), "brand")
    else:
        categories = _string_list(row.get("categories"), "categories")
        if not categories:
            categories = _string_list([row["main_category"]] if row.get("main_category") else [], "main_category")
        details = row.get("details")
        brand_value = details.get("Brand") if isinstance(details, dict) else None
        brand = _clean(brand_value if isinstance(brand_value, str) else row.get("store"), "store")
    return _Product(item_id, title, categories, brand, _description(row.get("description")))


def product_text(title: str, categories: list[str], brand: str, description: str = "") -> str:
    """``"<title>. Category: <a > b>. Brand: <brand>."`` without absent parts, at most MAX_TEXT_CHARS.

    The description stands in for a missing title.
    """
    parts = []
    lead = title or description
    if lead:
        parts.append(f"{lead}.")
    if categories:
        parts.append(f"Category: {' > '.join(categories)}.")
    if brand:
        parts.append(f"Brand: {brand}.")
    text = " ".join(parts)
    if len(text) > MAX_TEXT_CHARS:
        text = text[: MAX_TEXT_CHARS - 1].rstrip() + "…"
    return text


def _read_products(path: Path, schema: _Schema, problems: RowProblems) -> list[_Product]:
    products: list[_Product] = []
    first_line: dict[str, int] = {}
    seen_rows = False
    for line, row in _json_lines(path):
        seen_rows = True
        try:
            if isinstance(row, BadRow):
                raise row
            product = _parse_product(row, schema)
            if product.item_id in first_line:
                raise BadRow(
                    schema.meta_item_key,
                    f"duplicate item id '{product.item_id}' (first on line {first_line[product.item_id]})",
                    reason="duplicate_item",
                )
        except BadRow as bad:
            problems.report(path, line, bad)
            continue
        first_line[product.item_id] = line
        products.append(product)
    if not seen_rows:
        raise DataFormatError(str(path), "file is empty (no data rows)")
    if not products:
        raise DataFormatError(str(path), "no usable item rows (all were skipped)")
    return products


# --------------------------------------------------------------------------- reviews


def _parse_review(row: dict[str, Any], schema: _Schema, known_items: set[str], rating_required: bool) -> tuple[str, str, int, float | None]:
    user = _required_str(row, schema.user_key)
    item = _required_str(row, schema.item_key)
    stamp = _timestamp(row, schema.time_key) // schema.time_per_second
    rating = _rating(row, schema.rating_key, required=rating_required)
    if item not in known_items:
        raise BadRow("item_id", f"unknown item id '{item}' ({schema.item_key} not in the metadata file)", "unknown_item")
    return user, item, stamp, rating


def _read_reviews(path: Path, schema: _Schema, known_items: set[str], min_rating: float | None, problems: RowProblems) -> tuple[pd.DataFrame, int]:
    """Reviews in file order, and how many were dropped for a rating below ``min_rating``."""
    users: list[str] = []
    items: list[str] = []
    stamps: list[int] = []
    seen_rows = False
    below_min_rating = 0
    for line, row in _json_lines(path):
        seen_rows = True
        try:
            if isinstance(row, BadRow):
                raise row
            user, item, stamp, rating = _parse_review(row, schema, known_items, min_rating is not None)
        except BadRow as bad:
            problems.report(path, line, bad)
            continue
        if min_rating is not None and rating is not None and rating < min_rating:
            below_min_rating += 1
            continue
        users.append(user)
        items.append(item)
        stamps.append(stamp)
    if not seen_rows:
        raise DataFormatError(str(path), "file is empty (no data rows)")
    if below_min_rating:
        logger.info("%s: dropped %d review(s) rated below min_rating=%s", path, below_min_rating, min_rating)
    if not users:
        raise DataFormatError(str(path), "no usable review rows (all were skipped or below min_rating)")
    frame = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=str),
            "item_id": pd.Series(items, dtype=str),
            "timestamp": np.asarray(stamps, dtype=np.int64),
        }
    )
    return frame, below_min_rating


def _dataset_name(reviews_path: Path, version: str) -> str:
    stem = reviews_path.name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return f"amazon{version}-{stem}"


def read_amazon_reviews(
    reviews_path: str | Path,
    metadata_path: str | Path,
    version: str = "auto",
    skip_malformed: bool = False,
    min_rating: float | None = None,
) -> RawDataset:
    """Read an Amazon Reviews 2018/2023 category: reviews and item metadata (JSON lines, .gz allowed).

    ``version="auto"`` decides from the first review's keys. Reviews rated below ``min_rating`` are
    dropped and counted under ``skipped["below_min_rating"]``.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    reviews_path, metadata_path = Path(reviews_path), Path(metadata_path)
    if version == "auto":
        version = _detect_version(reviews_path, skip_malformed)
    schema = _SCHEMAS[version]
    problems = RowProblems(skip_malformed)
    products = _read_products(metadata_path, schema, problems)
    interactions, below_min_rating = _read_reviews(reviews_path, schema, {p.item_id for p in products}, min_rating, problems)
    items = pd.DataFrame(
        {
            "item_id": pd.Series([p.item_id for p in products], dtype=str),
            "text": pd.Series([product_text(p.title, p.categories, p.brand, p.description) for p in products], dtype=str),
            "title": pd.Series([p.title or p.description[:80] for p in products], dtype=str),
            "categories": pd.Series([list(p.categories) for p in products], dtype=object),
        }
    )
    name = _dataset_name(reviews_path, version)
    problems.log(name)
    skipped = dict(problems.counts)
    if below_min_rating:
        skipped["below_min_rating"] = below_min_rating
    return RawDataset(name=name, interactions=interactions, items=items, skipped=skipped)
