"""MovieLens loaders: ML-100K fetched from the RecBole wheel, the standard MovieLens files and RecBole atomic files
at a given path.

Conventions shared by every loader here:

* every rating is one implicit interaction (no threshold); ratings themselves are not kept;
* `item_ids` are the sorted union of the ids in the item file and in the ratings;
* an item's category is its first listed genre, coded over the sorted names of all genres listed in the item file;
  items with no genre ("unknown", "(no genres listed)", empty) or absent from the item file get one extra code,
  `num_categories - 1`, which exists only when some item needs it;
* `user_ids` are the sorted ids of the users that rated something; with a user file every one of them needs a row
  there, and the profile fields are `age` (7 groups, see `AGE_GROUPS`), `gender` (F=0, M=1) and `occupation`
  (ML-100K: codes over the sorted occupation names of the user file; ML-1M: its integers 0..20 as they are);
  without a user file `profiles` is empty.

Bad input (missing or empty file, wrong number of fields, a non-integer id or timestamp) raises `DataError`
naming the file, and the line where it is known.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dccl_sim.data.raw import DataError, RawDataset

__all__ = [
    "AGE_GROUPS",
    "GENDERS",
    "ML1M_AGE_CODES",
    "ML1M_NUM_OCCUPATIONS",
    "ML100K_FILES",
    "ML100K_GENRES",
    "RECBOLE_REQUIREMENT",
    "UNKNOWN_CATEGORY",
    "load_ml100k",
    "load_movielens",
    "load_recbole",
]

RECBOLE_REQUIREMENT = "recbole==1.2.1"
"""The wheel whose `recbole/dataset_example/ml-100k/` folder holds ML-100K in RecBole's atomic format."""
_WHEEL_FOLDER = "recbole/dataset_example/ml-100k"
ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")

AGE_GROUPS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
ML1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
"""ML-1M stores the lower bound of each of the `AGE_GROUPS`; these map to codes 0..6."""
GENDERS = ("F", "M")
ML1M_NUM_OCCUPATIONS = 21
UNKNOWN_CATEGORY = "unknown"
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
"""The genre flag columns of ML-100K's `u.item`, in order, used when no `u.genre` lies beside it."""
_NO_GENRE = frozenset({"", "unknown", "(no genres listed)"})
_PIP_TIMEOUT_S = 900


# ----------------------------------------------------------------------------------------------------------- public


def load_ml100k(cache_dir: Path) -> RawDataset:
    """MovieLens-100K (943 users, 1682 items, 100000 ratings) from RecBole's copy, cached in `cache_dir/ml-100k/`.

    When `ml-100k.inter`, `.user` and `.item` are not all in the cache folder, the RecBole wheel is fetched with
    `pip download --no-deps` (recbole itself is not installed) and just those three files are extracted, each written
    under a temporary name and then renamed, so an interrupted fetch never leaves a partial file.
    """
    folder = Path(cache_dir).expanduser() / "ml-100k"
    if not all((folder / name).is_file() for name in ML100K_FILES):
        _fetch_ml100k(folder)
    stamps = tuple((stat.st_mtime_ns, stat.st_size) for stat in (os.stat(folder / name) for name in ML100K_FILES))
    return _load_ml100k_once(folder.resolve(), stamps)


@functools.lru_cache(maxsize=1)
def _load_ml100k_once(folder: Path, stamps: tuple[tuple[int, int], ...]) -> RawDataset:
    """The cached files parsed once per process while they are unchanged (`stamps`: their times and sizes), so the
    points of a sweep share one load. Its arrays are read-only: no build may change what the next one reads."""
    raw = _load_atomic(folder / ML100K_FILES[0])
    for array in (raw.user_id, raw.item_id, raw.timestamp, raw.item_ids, raw.item_category, raw.user_ids):
        array.flags.writeable = False
    for array in raw.profiles.values():
        array.flags.writeable = False
    return raw


def load_movielens(path: Path) -> RawDataset:
    """Standard MovieLens files at `path`: a folder, or the ratings file itself; the format follows the file name.

    * `u.data` (ML-100K): side files `u.user`, `u.item` (latin-1) and `u.genre` beside it;
    * `ratings.dat` (ML-1M): side files `users.dat` and `movies.dat` (latin-1);
    * `ratings.csv` (ML-20M, ml-latest): side file `movies.csv`; these releases have no user file;
    * `<name>.inter` (RecBole atomic files, as `load_ml100k` caches them): side files `<name>.user`, `<name>.item`.

    Side files are optional: without an item file every item is in the unknown category, without a user file there
    are no profile fields.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected a MovieLens folder or its ratings file)")
    if path.is_dir():
        found = ratings_files(path)
        if not found:
            raise DataError(
                f"{path}: no MovieLens ratings file in this folder (expected u.data, ratings.dat, ratings.csv "
                "or a RecBole <name>.inter)"
            )
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: several ratings files ({names}); point at the one to use")
        path = found[0]
    if path.name in _LOADERS:
        return _LOADERS[path.name](path)
    if path.suffix == ".inter":
        return _load_atomic(path)
    raise DataError(
        f"{path}: unknown MovieLens file name (expected u.data, ratings.dat, ratings.csv or a RecBole <name>.inter)"
    )


def ratings_files(folder: Path) -> list[Path]:
    """The MovieLens ratings files in `folder` that `load_movielens` reads (one is expected)."""
    found = [folder / name for name in _LOADERS if (folder / name).is_file()]
    return found + sorted(p for p in folder.glob("*.inter") if p.is_file())


def load_recbole(path: Path) -> RawDataset:
    """RecBole atomic files at `path`: a folder holding exactly one `<name>.inter`, or that file; `<name>.user` and
    `<name>.item` beside it are optional, as for `load_movielens`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected RecBole atomic files, <name>.inter)")
    if path.is_dir():
        found = sorted(p for p in path.glob("*.inter") if p.is_file())
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise DataError(f"{path}: expected exactly one RecBole <name>.inter in this folder, found {names}")
        path = found[0]
    if path.suffix != ".inter":
        raise DataError(f"{path}: not a RecBole interaction file (expected <name>.inter)")
    return _load_atomic(path)


# ------------------------------------------------------------------------------------------------ per-format loaders


def _load_ml100k_files(path: Path) -> RawDataset:
    """`u.data`: `user<TAB>item<TAB>rating<TAB>timestamp`, no header."""
    users, items, times = _read_ratings(path, ["user", "item", "rating", "timestamp"], delimiter="\t")
    folder = path.parent
    genre_path = folder / "u.genre"
    genres = _read_u_genre(genre_path) if genre_path.is_file() else list(ML100K_GENRES)
    item_path, user_path = folder / "u.item", folder / "u.user"
    item_table = _read_u_item(item_path, genres) if item_path.is_file() else None
    user_table = _read_u_user(user_path) if user_path.is_file() else None
    return _assemble("ml-100k", path, users, items, times, item_table, user_table)


def _load_ml1m_files(path: Path) -> RawDataset:
    """`ratings.dat`: `user::item::rating::timestamp`, no header."""
    # '::' is two one-character delimiters around an empty field; those empty fields are checked.
    names = ["user", "sep1", "item", "sep2", "rating", "sep3", "timestamp"]
    users, items, times = _read_ratings(path, names, delimiter=":", separators=("sep1", "sep2", "sep3"))
    folder = path.parent
    item_path, user_path = folder / "movies.dat", folder / "users.dat"
    item_table = _read_movies_dat(item_path) if item_path.is_file() else None
    user_table = _read_users_dat(user_path) if user_path.is_file() else None
    return _assemble("ml-1m", path, users, items, times, item_table, user_table)


def _load_csv_files(path: Path) -> RawDataset:
    """`ratings.csv`: header `userId,movieId,rating,timestamp`."""
    header = _header_fields(path, ",")
    missing = [name for name in ("userId", "movieId", "timestamp") if name not in header]
    if missing:
        raise DataError(f"{path}, line 1: header must name userId, movieId and timestamp, got {','.join(header)!r}")
    users, items, times = _read_ratings(
        path, header, delimiter=",", skip_rows=1, quoted=True, columns=("userId", "movieId", "timestamp")
    )
    item_path = path.parent / "movies.csv"
    item_table = _read_movies_csv(item_path) if item_path.is_file() else None
    name = path.parent.name if path.parent.name.startswith("ml-") else "movielens"
    return _assemble(name, path, users, items, times, item_table, None)


def _load_atomic(path: Path) -> RawDataset:
    """RecBole atomic files: tab-separated with a typed header (`user_id:token<TAB>item_id:token<TAB>...`)."""
    header = [field.split(":", 1)[0] for field in _header_fields(path, "\t")]
    if not {"user_id", "item_id", "timestamp"} <= set(header) or len(set(header)) != len(header):
        raise DataError(f"{path}, line 1: header must name user_id, item_id and timestamp once each, got {header!r}")
    users, items, times = _read_ratings(
        path, header, delimiter="\t", skip_rows=1, columns=("user_id", "item_id", "timestamp")
    )
    item_path, user_path = path.with_suffix(".item"), path.with_suffix(".user")
    item_table = _read_atomic_items(item_path) if item_path.is_file() else None
    user_table = _read_atomic_users(user_path) if user_path.is_file() else None
    return _assemble(path.stem, path, users, items, times, item_table, user_table)


_LOADERS = {"u.data": _load_ml100k_files, "ratings.dat": _load_ml1m_files, "ratings.csv": _load_csv_files}


# --------------------------------------------------------------------------------------------------------- ratings


def _read_ratings(
    path: Path,
    names: Sequence[str],
    *,
    delimiter: str,
    skip_rows: int = 0,
    quoted: bool = False,
    columns: tuple[str, str, str] = ("user", "item", "timestamp"),
    separators: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, timestamp) int64 arrays from a delimited ratings file, parsed by pyarrow."""
    _check_file(path)
    names = list(names)
    user_col, item_col, time_col = columns

    def read(use_threads: bool) -> pa.Table:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip_rows, use_threads=use_threads),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoted else False),
            convert_options=pacsv.ConvertOptions(
                column_types={user_col: pa.int64(), item_col: pa.int64(), time_col: pa.int64()}
                | {sep: pa.string() for sep in separators},
                include_columns=[user_col, item_col, time_col, *separators],
                null_values=[],
                strings_can_be_null=False,
            ),
        )

    try:
        table = read(use_threads=True)
    except (pa.ArrowException, OSError):
        # Multithreaded parsing drops the row number from error messages: parse again on one thread to name it.
        try:
            read(use_threads=False)
        except (pa.ArrowException, OSError) as err:
            message = _describe_arrow_error(err, names)
            if separators:  # the column count pyarrow sees is not the field count a reader knows
                message = re.sub(r"Expected \d+ columns, got \d+", "expected 4 fields separated by '::'", message)
            raise DataError(f"{path}: corrupt file ({message})") from None
        raise DataError(f"{path}: cannot be parsed") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: empty file (no ratings)")
    for sep in separators:
        nonempty = pc.not_equal(table.column(sep), "")
        if pc.any(nonempty).as_py():
            row = int(pc.index(nonempty, True).as_py()) + 1 + skip_rows
            raise DataError(f"{path}: corrupt file (row {row}: fields must be separated by '::')")
    return tuple(np.ascontiguousarray(table.column(c).to_numpy(), dtype=np.int64) for c in columns)  # type: ignore[return-value]


def _describe_arrow_error(err: Exception, names: Sequence[str]) -> str:
    """pyarrow's message, its rows as "row N" (header included) and its 0-based column numbers as our names."""
    text = str(err).replace("\t", "\\t").replace("\r", "\\r").removeprefix("CSV parse error: ")

    def column(index: str) -> str:
        return f"column {names[int(index)]!r}" if int(index) < len(names) else f"column #{index}"

    text = re.sub(r"In CSV column #(\d+): Row #(\d+):", lambda m: f"row {m[2]}, {column(m[1])}:", text)
    text = re.sub(r"In CSV column #(\d+):", lambda m: f"{column(m[1])}:", text)
    return re.sub(r"Row #(\d+)", r"row \1", text)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")


def _header_fields(path: Path, delimiter: str) -> list[str]:
    _check_file(path)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        line = f.readline().rstrip("\r\n")
    if not line.strip():
        raise DataError(f"{path}, line 1: header line expected, found an empty line")
    fields = next(csv.reader([line])) if delimiter == "," else line.split(delimiter)
    return [field.strip() for field in fields]


# ------------------------------------------------------------------------------------------------------ side files


@dataclass
class _Items:
    """Item file contents: ids in file order, each item's first genre (None: no genre), every genre named."""

    path: Path
    ids: np.ndarray
    first_genre: list[str | None]
    genres: set[str]


@dataclass
class _Users:
    """User file contents: ids in file order and, per profile field, one code per id."""

    path: Path
    ids: np.ndarray
    profiles: dict[str, np.ndarray]
    cardinalities: dict[str, int]


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a small side file."""
    _check_file(path)
    try:
        with open(path, encoding=encoding, newline="") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid {encoding} text ({err.reason} at byte {err.start})") from None
    lines = text.splitlines()
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield number, line


def _split(path: Path, number: int, line: str, delimiter: str, count: int) -> list[str]:
    fields = line.split(delimiter)
    if len(fields) != count:
        raise DataError(f"{path}, line {number}: expected {count} fields separated by {delimiter!r}, got {len(fields)}")
    return fields


def _int(path: Path, number: int, text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DataError(f"{path}, line {number}: {what} {text!r} is not an integer") from None


def _unique_ids(path: Path, ids: list[int], numbers: list[int], what: str) -> np.ndarray:
    array = np.asarray(ids, dtype=np.int64)
    seen: dict[int, int] = {}
    for value, number in zip(ids, numbers, strict=True):
        if value in seen:
            raise DataError(f"{path}, line {number}: {what} id {value} already given on line {seen[value]}")
        seen[value] = number
    return array


def _empty_check(path: Path, rows: Sequence[object], what: str) -> None:
    if not rows:
        raise DataError(f"{path}: empty file (no {what})")


def _first_genre(names: Sequence[str]) -> str | None:
    names = [n.strip() for n in names if n.strip()]
    return None if not names or names[0] in _NO_GENRE else names[0]


def _items(path: Path, ids: list[int], numbers: list[int], genre_lists: list[list[str]]) -> _Items:
    _empty_check(path, ids, "items")
    genres = {g.strip() for names in genre_lists for g in names if g.strip() not in _NO_GENRE}
    return _Items(path, _unique_ids(path, ids, numbers, "item"), [_first_genre(g) for g in genre_lists], genres)


def _read_u_genre(path: Path) -> list[str]:
    """`u.genre`: `name|index` lines, indices 0, 1, 2, ... in order."""
    names: list[str] = []
    for number, line in _lines(path, "latin-1"):
        name, index = _split(path, number, line, "|", 2)
        if _int(path, number, index, "genre index") != len(names):
            raise DataError(f"{path}, line {number}: genre index {index} out of order (expected {len(names)})")
        names.append(name)
    _empty_check(path, names, "genres")
    return names


def _read_u_item(path: Path, genres: Sequence[str]) -> _Items:
    """`u.item`: `item|title|release date|video release date|url|` then one 0/1 flag per genre."""
    ids, numbers, genre_lists = [], [], []
    for number, line in _lines(path, "latin-1"):
        fields = _split(path, number, line, "|", 5 + len(genres))
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(f"{path}, line {number}: genre flags must be 0 or 1")
        ids.append(_int(path, number, fields[0], "item id"))
        numbers.append(number)
        genre_lists.append([g for g, flag in zip(genres, flags, strict=True) if flag == "1"])
    return _items(path, ids, numbers, genre_lists)


def _read_movies_dat(path: Path) -> _Items:
    """`movies.dat`: `item::title::Genre1|Genre2` (titles may hold ':')."""
    ids, numbers, genre_lists = [], [], []
    for number, line in _lines(path, "latin-1"):
        head, sep1, rest = line.partition("::")
        _title, sep2, genres = rest.rpartition("::")
        if not (sep1 and sep2):
            raise DataError(f"{path}, line {number}: expected 3 fields separated by '::' (item::title::genres)")
        ids.append(_int(path, number, head, "item id"))
        numbers.append(number)
        genre_lists.append(genres.split("|"))
    return _items(path, ids, numbers, genre_lists)


def _read_movies_csv(path: Path) -> _Items:
    """`movies.csv`: header `movieId,title,genres`; quoted titles may hold commas; genres '|'-separated."""
    _check_file(path)
    ids, numbers, genre_lists = [], [], []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header][:1] != ["movieId"] or "genres" not in header:
                raise DataError(f"{path}, line 1: header must be movieId,title,genres, got {header!r}")
            genre_index = header.index("genres")
            for row in reader:
                if not row or not any(field.strip() for field in row):
                    continue
                number = reader.line_num
                if len(row) != len(header):
                    raise DataError(f"{path}, line {number}: expected {len(header)} fields, got {len(row)}")
                ids.append(_int(path, number, row[0], "movieId"))
                numbers.append(number)
                genre_lists.append(row[genre_index].split("|"))
    except csv.Error as err:
        raise DataError(f"{path}: corrupt file ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 text ({err.reason} at byte {err.start})") from None
    return _items(path, ids, numbers, genre_lists)


def _read_atomic_items(path: Path) -> _Items:
    """RecBole `.item`: typed header with `item_id` and a space-separated genre list (`class` or `genre`)."""
    rows = list(_lines(path, "utf-8"))
    if not rows:
        raise DataError(f"{path}: empty file")
    header = [field.split(":", 1)[0] for field in rows[0][1].split("\t")]
    genre_field = next((name for name in ("class", "genre", "genres") if name in header), None)
    if "item_id" not in header or genre_field is None:
        raise DataError(f"{path}, line 1: header must name item_id and class (the genres), got {header!r}")
    item_index, genre_index = header.index("item_id"), header.index(genre_field)
    ids, numbers, genre_lists = [], [], []
    for number, line in rows[1:]:
        fields = _split(path, number, line, "\t", len(header))
        ids.append(_int(path, number, fields[item_index], "item id"))
        numbers.append(number)
        genre_lists.append(fields[genre_index].split())
    return _items(path, ids, numbers, genre_lists)


def _raw_age_group(path: Path, number: int, text: str) -> int:
    age = _int(path, number, text, "age")
    if age < 0:
        raise DataError(f"{path}, line {number}: age {age} is negative")
    return int(np.searchsorted(_AGE_EDGES, age, side="right"))


def _gender(path: Path, number: int, text: str) -> int:
    text = text.strip()
    if text not in GENDERS:
        raise DataError(f"{path}, line {number}: gender {text!r} is neither F nor M")
    return GENDERS.index(text)


def _users(
    path: Path, ids: list[int], numbers: list[int], fields: dict[str, list[int]], cards: dict[str, int]
) -> _Users:
    _empty_check(path, ids, "users")
    profiles = {name: np.asarray(codes, dtype=np.int64) for name, codes in fields.items()}
    return _Users(path, _unique_ids(path, ids, numbers, "user"), profiles, cards)


def _occupation_codes(names: list[str]) -> tuple[list[int], int]:
    vocabulary = sorted(set(names))
    index = {name: code for code, name in enumerate(vocabulary)}
    return [index[name] for name in names], len(vocabulary)


def _read_u_user(path: Path) -> _Users:
    """`u.user`: `user|age|gender|occupation|zip`, raw ages and occupation names."""
    ids, numbers, ages, genders, occupations = [], [], [], [], []
    for number, line in _lines(path, "latin-1"):
        user, age, gender, occupation, _zip = _split(path, number, line, "|", 5)
        ids.append(_int(path, number, user, "user id"))
        numbers.append(number)
        ages.append(_raw_age_group(path, number, age))
        genders.append(_gender(path, number, gender))
        occupations.append(occupation.strip())
    codes, count = _occupation_codes(occupations)
    cards = {"age": len(AGE_GROUPS), "gender": len(GENDERS), "occupation": count}
    return _users(path, ids, numbers, {"age": ages, "gender": genders, "occupation": codes}, cards)


def _read_users_dat(path: Path) -> _Users:
    """`users.dat`: `user::gender::age::occupation::zip`, ages as group codes, occupations as integers 0..20."""
    ids, numbers, ages, genders, occupations = [], [], [], [], []
    for number, line in _lines(path, "latin-1"):
        user, gender, age, occupation, _zip = _split(path, number, line, "::", 5)
        ids.append(_int(path, number, user, "user id"))
        numbers.append(number)
        age_code = _int(path, number, age, "age")
        if age_code not in ML1M_AGE_CODES:
            raise DataError(f"{path}, line {number}: age {age_code} is not one of the ML-1M codes {ML1M_AGE_CODES}")
        ages.append(ML1M_AGE_CODES.index(age_code))
        genders.append(_gender(path, number, gender))
        occupation_code = _int(path, number, occupation, "occupation")
        if not 0 <= occupation_code < ML1M_NUM_OCCUPATIONS:
            raise DataError(
                f"{path}, line {number}: occupation {occupation_code} outside 0..{ML1M_NUM_OCCUPATIONS - 1}"
            )
        occupations.append(occupation_code)
    cards = {"age": len(AGE_GROUPS), "gender": len(GENDERS), "occupation": ML1M_NUM_OCCUPATIONS}
    return _users(path, ids, numbers, {"age": ages, "gender": genders, "occupation": occupations}, cards)


def _read_atomic_users(path: Path) -> _Users:
    """RecBole `.user`: typed header with `user_id` and any of `age` (raw years), `gender`, `occupation` (names)."""
    rows = list(_lines(path, "utf-8"))
    if not rows:
        raise DataError(f"{path}: empty file")
    header = [field.split(":", 1)[0] for field in rows[0][1].split("\t")]
    if "user_id" not in header:
        raise DataError(f"{path}, line 1: header must name user_id, got {header!r}")
    ids, numbers = [], []
    columns: dict[str, list] = {name: [] for name in ("age", "gender", "occupation") if name in header}
    for number, line in rows[1:]:
        fields = dict(zip(header, _split(path, number, line, "\t", len(header)), strict=True))
        ids.append(_int(path, number, fields["user_id"], "user id"))
        numbers.append(number)
        if "age" in columns:
            columns["age"].append(_raw_age_group(path, number, fields["age"]))
        if "gender" in columns:
            columns["gender"].append(_gender(path, number, fields["gender"]))
        if "occupation" in columns:
            columns["occupation"].append(fields["occupation"].strip())
    cards = {"age": len(AGE_GROUPS), "gender": len(GENDERS)}
    if "occupation" in columns:
        columns["occupation"], cards["occupation"] = _occupation_codes(columns["occupation"])
    return _users(path, ids, numbers, columns, {name: cards[name] for name in columns})


# -------------------------------------------------------------------------------------------------------- assembly


def _assemble(
    name: str,
    ratings_path: Path,
    user_id: np.ndarray,
    item_id: np.ndarray,
    timestamp: np.ndarray,
    items: _Items | None,
    users: _Users | None,
) -> RawDataset:
    rated_items = _sorted_unique(item_id)
    if items is None:
        item_ids, item_category, num_categories = rated_items, np.zeros(len(rated_items), dtype=np.int64), 1
    else:
        genres = sorted(items.genres)
        code = {genre: index for index, genre in enumerate(genres)}
        file_codes = np.array([code.get(g, -1) if g is not None else -1 for g in items.first_genre], dtype=np.int64)
        order = np.argsort(items.ids, kind="stable")
        file_ids, file_codes = items.ids[order], file_codes[order]
        item_ids = np.union1d(file_ids, rated_items)
        item_category = np.full(len(item_ids), -1, dtype=np.int64)
        item_category[np.searchsorted(item_ids, file_ids)] = file_codes
        unknown = item_category < 0
        item_category[unknown] = len(genres)
        num_categories = len(genres) + int(unknown.any())

    user_ids = _sorted_unique(user_id)
    profiles: dict[str, np.ndarray] = {}
    cardinalities: dict[str, int] = {}
    if users is not None:
        order = np.argsort(users.ids, kind="stable")
        known = users.ids[order]
        pos = np.minimum(np.searchsorted(known, user_ids), max(len(known) - 1, 0))
        missing = known[pos] != user_ids
        if missing.any():
            example = int(user_ids[missing][0])
            raise DataError(
                f"{users.path}: user {example} rates items in {ratings_path.name} but has no row here "
                f"({int(missing.sum())} such users); every rating user needs a profile"
            )
        profiles = {field: codes[order][pos] for field, codes in users.profiles.items()}
        cardinalities = dict(users.cardinalities)

    return RawDataset(
        name=name,
        user_id=user_id,
        item_id=item_id,
        timestamp=timestamp,
        item_ids=item_ids,
        item_category=item_category,
        num_categories=num_categories,
        user_ids=user_ids,
        profiles=profiles,
        profile_cardinalities=cardinalities,
    )


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique` for tens of millions of ids: pyarrow's hash table, then a sort of the few distinct values."""
    return np.sort(pc.unique(pa.array(values)).to_numpy(zero_copy_only=False)).astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------------------- download


def _fetch_ml100k(folder: Path) -> None:
    """Extract the three ML-100K atomic files from the RecBole wheel into `folder`, each atomically."""
    what_to_do = (
        f"Without network access, copy {', '.join(ML100K_FILES)} (from the {RECBOLE_REQUIREMENT} wheel, folder "
        f"{_WHEEL_FOLDER}/) into {folder}, or point data.source at a MovieLens folder (e.g. an unpacked ml-100k "
        "with u.data)."
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{folder}: cannot create the ML-100K cache folder ({err.strerror})") from None
    with tempfile.TemporaryDirectory(prefix="dccl-ml100k-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            RECBOLE_REQUIREMENT,
            "-d",
            tmp,
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DataError(
                f"cannot fetch MovieLens-100K: `pip download {RECBOLE_REQUIREMENT}` failed ({err}). {what_to_do}"
            ) from None
        if done.returncode != 0:
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"exit status {done.returncode}"
            raise DataError(
                f"cannot fetch MovieLens-100K: `pip download {RECBOLE_REQUIREMENT}` failed ({reason}). {what_to_do}"
            )
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if not wheels:
            raise DataError(f"cannot fetch MovieLens-100K: pip downloaded no recbole wheel. {what_to_do}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                for name in ML100K_FILES:
                    target = folder / name
                    if target.is_file():
                        continue
                    try:
                        data = wheel.read(f"{_WHEEL_FOLDER}/{name}")
                    except KeyError:
                        raise DataError(f"{wheels[0].name}: no {_WHEEL_FOLDER}/{name} inside. {what_to_do}") from None
                    _write_atomically(target, data)
        except zipfile.BadZipFile as err:
            raise DataError(f"{wheels[0].name}: not a readable wheel ({err}). {what_to_do}") from None


def _write_atomically(target: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates it private; the cache is ordinary data
        os.replace(tmp_name, target)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise DataError(f"{target}: cannot write ({err.strerror})") from None
        raise
