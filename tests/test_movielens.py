"""MovieLens loaders: tiny hand-written files for each format, bad input, and the real ML-100K once per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from dccl_sim.data import movielens
from dccl_sim.data.movielens import load_ml100k, load_movielens
from dccl_sim.data.raw import DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def eq(actual: np.ndarray, expected: list[int]) -> None:
    np.testing.assert_array_equal(actual, np.asarray(expected, dtype=np.int64))


# --------------------------------------------------------------------------------------------------------- ML-100K


@pytest.fixture
def ml100k_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    write(folder / "u.data", "1\t10\t5\t100\n2\t10\t3\t200\n1\t20\t4\t300\n3\t30\t1\t400\n2\t40\t2\t500\n")
    # Flags follow u.genre's order, which is not alphabetical here: item 10 is Comedy first, then Action.
    write(folder / "u.genre", "unknown|0\nComedy|1\nAction|2\nDrama|3\n\n")
    write(
        folder / "u.item",
        "10|Café (1995)|01-Jan-1995||url|0|1|1|0\n"
        "20|Two|01-Jan-1995||url|0|0|0|1\n"
        "30|Three|01-Jan-1995||url|1|0|0|0\n"
        "50|Unrated|01-Jan-1995||url|0|0|1|0\n",
        encoding="latin-1",
    )
    write(folder / "u.user", "1|17|M|student|11111\n2|30|F|engineer|22222\n3|56|M|artist|33333\n4|45|F|doctor|4\n")
    return folder


def test_ml100k_files(ml100k_dir: Path) -> None:
    for path in (ml100k_dir, ml100k_dir / "u.data"):
        data = load_movielens(path)
        assert data.name == "ml-100k"
        eq(data.user_id, [1, 2, 1, 3, 2])
        eq(data.item_id, [10, 10, 20, 30, 40])
        eq(data.timestamp, [100, 200, 300, 400, 500])
        # Genres named: Action 0, Comedy 1, Drama 2; unknown 3 (item 30 flags "unknown", item 40 is not in u.item).
        eq(data.item_ids, [10, 20, 30, 40, 50])
        eq(data.item_category, [1, 2, 3, 3, 0])
        assert data.num_categories == 4
        # User 4 rated nothing: not a user of the dataset; occupations sorted over the whole file.
        eq(data.user_ids, [1, 2, 3])
        eq(data.profiles["age"], [0, 2, 6])
        eq(data.profiles["gender"], [1, 0, 1])
        eq(data.profiles["occupation"], [3, 2, 0])  # artist 0, doctor 1, engineer 2, student 3
        assert data.profile_cardinalities == {"age": 7, "gender": 2, "occupation": 4}


def test_ml100k_age_groups_and_default_genres(tmp_path: Path) -> None:
    ages = [0, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 90]
    write(tmp_path / "u.data", "".join(f"{u}\t1\t3\t{u}\n" for u in range(1, len(ages) + 1)))
    write(tmp_path / "u.user", "".join(f"{u}|{age}|F|other|0\n" for u, age in enumerate(ages, start=1)))
    # No u.genre: the 19 standard ML-100K flag columns (unknown, Action, Adventure, ...); item 1 is Adventure first.
    flags = ["0"] * 19
    flags[2] = flags[5] = "1"
    write(tmp_path / "u.item", "1|T|d||u|" + "|".join(flags) + "\n")
    data = load_movielens(tmp_path)
    eq(data.profiles["age"], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6])
    assert data.profile_cardinalities["occupation"] == 1
    eq(data.item_category, [0])  # Adventure 0, Comedy 1
    assert data.num_categories == 2


def test_ml100k_without_side_files(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "5\t7\t1\t1\n6\t8\t1\t2\n5\t8\t1\t3\n")
    data = load_movielens(tmp_path / "u.data")
    eq(data.item_ids, [7, 8])
    eq(data.item_category, [0, 0])
    assert data.num_categories == 1
    eq(data.user_ids, [5, 6])
    assert data.profiles == {} and data.profile_cardinalities == {}


# ----------------------------------------------------------------------------------------------------------- ML-1M


@pytest.fixture
def ml1m_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-1m"
    write(folder / "ratings.dat", "1::100::5::978300760\n2::100::3::978302109\n2::200::4::978301968\n")
    write(folder / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::0::1\n")
    write(
        folder / "movies.dat",
        "100::Toy Story (1995)::Animation|Children's|Comedy\n"
        "200::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Sci-Fi\n"
        "300::Café Society (1995)::Drama\n",
        encoding="latin-1",
    )
    return folder


def test_ml1m_files(ml1m_dir: Path) -> None:
    data = load_movielens(ml1m_dir)
    assert data.name == "ml-1m"
    eq(data.user_id, [1, 2, 2])
    eq(data.item_id, [100, 100, 200])
    eq(data.timestamp, [978300760, 978302109, 978301968])
    # Action 0, Adventure 1, Animation 2, Children's 3, Comedy 4, Drama 5, Sci-Fi 6; no unknown needed.
    eq(data.item_ids, [100, 200, 300])
    eq(data.item_category, [2, 0, 5])
    assert data.num_categories == 7
    eq(data.user_ids, [1, 2])
    eq(data.profiles["age"], [0, 6])
    eq(data.profiles["gender"], [0, 1])
    eq(data.profiles["occupation"], [10, 16])
    assert data.profile_cardinalities == {"age": 7, "gender": 2, "occupation": 21}


def test_ml1m_user_without_profile(ml1m_dir: Path) -> None:
    write(ml1m_dir / "ratings.dat", "1::100::5::1\n9::100::5::2\n")
    with pytest.raises(DataError, match=r"users\.dat.*user 9"):
        load_movielens(ml1m_dir / "ratings.dat")


# ------------------------------------------------------------------------------------------------ ML-20M / latest


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-latest-small"
    # A quoted header is still a header.
    write(
        folder / "ratings.csv", '"userId",movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n7,5,0.5,9\n'
    )
    write(
        folder / "movies.csv",
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        '3,"Heat, ""Big"" (1995)",(no genres listed)\n',
    )
    return folder


def test_csv_files(csv_dir: Path) -> None:
    data = load_movielens(csv_dir)
    assert data.name == "ml-latest-small"
    eq(data.user_id, [1, 1, 7])
    eq(data.item_id, [1, 3, 5])
    eq(data.timestamp, [964982703, 964981247, 9])
    # Adventure 0, Animation 1, Children 2, Comedy 3, Drama 4, Fantasy 5, Romance 6; unknown 7 (no genres, not listed).
    eq(data.item_ids, [1, 2, 3, 5])
    eq(data.item_category, [0, 3, 7, 7])
    assert data.num_categories == 8
    eq(data.user_ids, [1, 7])
    assert data.profiles == {} and data.profile_cardinalities == {}


def test_csv_without_movies(csv_dir: Path) -> None:
    (csv_dir / "movies.csv").unlink()
    data = load_movielens(csv_dir / "ratings.csv")
    eq(data.item_ids, [1, 3, 5])
    eq(data.item_category, [0, 0, 0])
    assert data.num_categories == 1


# ------------------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_movielens(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no MovieLens ratings file"):
        load_movielens(tmp_path)
    with pytest.raises(DataError, match=r"unknown MovieLens file name"):
        load_movielens(write(tmp_path / "scores.txt", "1\t2\t3\t4\n"))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("u.data", "", r"u\.data: empty file"),
        ("u.data", "\n\n", r"u\.data: empty file"),
        ("u.data", "1\t2\t3\t4\n1\t2\t3\n", r"u\.data: corrupt file.*row 2.*Expected 4 columns"),
        ("u.data", "1\t2\t3\t4\n1\tx\t3\t4\n", r"u\.data: corrupt file.*row 2.*'item'.*'x'"),
        ("u.data", "1\t2\t3\t4.5\n", r"u\.data: corrupt file.*'timestamp'"),
        ("u.data", "1\t\t3\t4\n", r"u\.data: corrupt file.*'item'"),
        (
            "ratings.dat",
            "1::2::3::4\n1::2:3::4\n",
            r"ratings\.dat: corrupt file.*row 2: expected 4 fields separated by '::'",
        ),
        ("ratings.dat", "1::2::3::4\n1:x:2::3::4\n", r"ratings\.dat: corrupt file.*row 2.*'::'"),
        ("ratings.dat", "1::2::3::1e9\n", r"ratings\.dat: corrupt file.*'timestamp'"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n", r"ratings\.csv: empty file"),
        ("ratings.csv", "user,movie,rating,timestamp\n1,2,3,4\n", r"ratings\.csv, line 1: header"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4,5\n", r"ratings\.csv: corrupt file.*row 2"),
    ],
)
def test_bad_ratings(tmp_path: Path, name: str, text: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        load_movielens(write(tmp_path / name, text))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("u.user", "1|20|M|student\n", r"u\.user, line 1: expected 5 fields"),
        ("u.user", "1|20|M|student|0\n2|x|F|other|0\n", r"u\.user, line 2: age 'x'"),
        ("u.user", "1|20|X|student|0\n", r"u\.user, line 1: gender 'X'"),
        ("u.user", "", r"u\.user: empty file"),
        ("u.item", "1|T|d||u|0|1|0|0\n", r"u\.item, line 1: expected 24 fields"),
        ("u.item", "1|T|d||u|" + "|".join("0" * 18) + "|2\n", r"u\.item, line 1: genre flags"),
        ("users.dat", "1::F::20::1::0\n", r"users\.dat, line 1: age 20"),
        ("users.dat", "1::F::18::21::0\n", r"users\.dat, line 1: occupation 21"),
        ("movies.dat", "1::Toy Story|Comedy\n", r"movies\.dat, line 1: expected 3 fields"),
        ("movies.dat", "1::A::Drama\n1::B::Comedy\n", r"movies\.dat, line 2: item id 1 already given on line 1"),
        ("movies.csv", "movieId,title,genres\n1,A,Drama\n2,Heat, The,Drama\n", r"movies\.csv, line 3: expected 3"),
        ("movies.csv", "movieId,title,genres\nx,A,Drama\n", r"movies\.csv, line 2: movieId 'x'"),
    ],
)
def test_bad_side_files(tmp_path: Path, name: str, text: str, expected: str) -> None:
    ratings = {"u.user": "u.data", "u.item": "u.data", "users.dat": "ratings.dat", "movies.dat": "ratings.dat"}
    ratings_name = ratings.get(name, "ratings.csv")
    if ratings_name == "u.data":
        write(tmp_path / ratings_name, "1\t1\t5\t1\n")
    elif ratings_name == "ratings.dat":
        write(tmp_path / ratings_name, "1::1::5::1\n")
    else:
        write(tmp_path / ratings_name, "userId,movieId,rating,timestamp\n1,1,5,1\n")
    write(tmp_path / name, text)
    with pytest.raises(DataError, match=expected):
        load_movielens(tmp_path)


# ------------------------------------------------------------------------------------------------ ML-100K download


def atomic_files(folder: Path) -> None:
    write(
        folder / "ml-100k.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n2\t5\t3\t10\n1\t6\t4\t20\n",
    )
    write(folder / "ml-100k.user", "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
    with open(folder / "ml-100k.user", "a") as f:
        f.write("1\t24\tM\ttechnician\t1\n2\t60\tF\tartist\t2\n")
    write(
        folder / "ml-100k.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "5\tA\t1995\tDrama Comedy\n6\tB\t1995\tunknown\n7\tC\t1990\tAction\n",
    )


def test_ml100k_cache_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    atomic_files(tmp_path / "ml-100k")

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the cache holds the files")

    monkeypatch.setattr(movielens.subprocess, "run", no_pip)
    data = load_ml100k(tmp_path)
    assert data.name == "ml-100k"
    eq(data.user_id, [2, 1])
    eq(data.item_id, [5, 6])
    eq(data.timestamp, [10, 20])
    eq(data.item_ids, [5, 6, 7])
    eq(data.item_category, [2, 3, 0])  # Action 0, Comedy 1, Drama 2, unknown 3
    assert data.num_categories == 4
    eq(data.user_ids, [1, 2])
    eq(data.profiles["age"], [1, 6])
    eq(data.profiles["gender"], [1, 0])
    eq(data.profiles["occupation"], [1, 0])
    assert data.profile_cardinalities == {"age": 7, "gender": 2, "occupation": 2}
    # The same folder also loads through load_movielens (a RecBole .inter file).
    eq(load_movielens(tmp_path / "ml-100k").item_category, [2, 3, 0])


def test_ml100k_is_parsed_once_per_process_while_its_files_are_unchanged(tmp_path: Path) -> None:
    atomic_files(tmp_path / "ml-100k")
    first = load_ml100k(tmp_path)
    assert load_ml100k(tmp_path) is first  # a sweep's points share one parse
    assert not first.user_id.flags.writeable and not first.profiles["age"].flags.writeable  # no build can change it
    with pytest.raises(ValueError, match="read-only"):
        first.timestamp[0] = 0
    # a changed file is read again
    inter = tmp_path / "ml-100k" / "ml-100k.inter"
    inter.write_text(inter.read_text() + "1\t7\t4\t30\n")
    again = load_ml100k(tmp_path)
    assert again is not first
    eq(again.item_id, [5, 6, 7])


def test_ml100k_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for recbole==1.2.1\n")

    monkeypatch.setattr(movielens.subprocess, "run", failing_pip)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="No matching distribution") as caught:
        load_ml100k(cache)
    assert str(cache / "ml-100k") in str(caught.value)
    assert "data.source" in str(caught.value)
    assert list((cache / "ml-100k").iterdir()) == []


@pytest.fixture(scope="session")
def ml100k_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ml100k-cache")


def test_real_ml100k(ml100k_cache: Path) -> None:
    data = load_ml100k(ml100k_cache)
    assert sorted(p.name for p in (ml100k_cache / "ml-100k").iterdir()) == sorted(movielens.ML100K_FILES)
    assert data.name == "ml-100k"
    assert len(data.user_ids) == 943
    assert len(data.item_ids) == 1682
    assert len(data.user_id) == len(data.item_id) == len(data.timestamp) == 100_000
    eq(data.user_ids, list(range(1, 944)))
    eq(data.item_ids, list(range(1, 1683)))
    # 18 named genres (Action 0 ... Western 17) and unknown 18 (items 267 and 1373).
    assert data.num_categories == 19
    assert np.bincount(data.item_category, minlength=19).min() >= 1
    assert data.item_category[0] == 2  # Toy Story: Animation first
    eq(np.flatnonzero(data.item_category == 18) + 1, [267, 1373])
    assert data.profile_cardinalities == {"age": 7, "gender": 2, "occupation": 21}
    assert int(data.profiles["gender"].sum()) == 670  # men
    assert (data.profiles["age"][0], data.profiles["gender"][0], data.profiles["occupation"][0]) == (1, 1, 19)
    # Loaded again from the cache: identical.
    again = load_movielens(ml100k_cache / "ml-100k")
    np.testing.assert_array_equal(again.item_category, data.item_category)
    np.testing.assert_array_equal(again.timestamp, data.timestamp)
