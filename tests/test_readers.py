"""Readers: every format on small files built here, detection, errors, and the real datasets."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from recforge.data.describe import describe, format_description
from recforge.data.prepare import prepare
from recforge.data.readers import (
    READERS,
    detect_format,
    load_raw,
    read_lightgcn,
    read_lightgcn_lastfm,
    read_movielens_100k,
    read_movielens_csv,
    read_movielens_dat,
    read_recbole,
    read_sequences,
    read_table,
    read_userbehavior,
    reader_key,
)
from recforge.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def rows(df: pl.DataFrame, *cols: str) -> list[tuple]:
    return df.select(cols).rows()


# ---------------------------------------------------------------------------------------------
# read_table
# ---------------------------------------------------------------------------------------------
def test_table_csv_maps_columns_and_keeps_order(tmp_path):
    f = write(tmp_path / "log.csv", "uid,iid,ts,stars,note\n7,10,300,4.5,a\n3,11,100,2,b\n7,12,300,5,c\n")
    raw = read_table(f, user_col="uid", item_col="iid", time_col="ts", rating_col="stars")
    df = raw.interactions
    assert df.columns == ["user_id", "item_id", "timestamp", "rating", "note"]
    assert df.schema["user_id"] == pl.Int64 and df.schema["item_id"] == pl.Int64
    assert df.schema["rating"] == pl.Float64
    assert rows(df, "user_id", "item_id", "timestamp", "rating") == [(7, 10, 300, 4.5), (3, 11, 100, 2.0), (7, 12, 300, 5.0)]
    assert df["note"].to_list() == ["a", "b", "c"]
    assert raw.name == "log" and raw.meta["time"] == "seconds"


def test_table_tsv_string_ids_behavior_and_item_file(tmp_path):
    f = write(tmp_path / "clicks.tsv", "user\titem\ttimestamp\taction\nu1\tA\t5\tclick\nu2\t007\t6\tbuy\nu1\tB\t7\tclick\n")
    items = write(tmp_path / "items.csv", "sku,title,tags\nA,Apple,fruit\nB,\"Banana, ripe\",fruit\n007,Bond,film\n")
    raw = read_table(f, user_col="user", item_col="item", behavior_col="action", items=items, item_key="sku")
    df = raw.interactions
    assert df.schema["user_id"] == pl.Utf8 and df.schema["item_id"] == pl.Utf8
    assert rows(df, "user_id", "item_id", "behavior") == [("u1", "A", "click"), ("u2", "007", "buy"), ("u1", "B", "click")]
    assert raw.items.columns == ["item_id", "title", "tags"]
    assert raw.items.schema["item_id"] == pl.Utf8
    assert dict(rows(raw.items, "item_id", "title")) == {"A": "Apple", "B": "Banana, ripe", "007": "Bond"}


def test_table_leading_zero_ids_stay_text(tmp_path):
    f = write(tmp_path / "x.csv", "user_id,item_id,timestamp\n1,007,1\n1,7,2\n")
    df = read_table(f).interactions
    assert df.schema["item_id"] == pl.Utf8
    assert df["item_id"].to_list() == ["007", "7"]
    assert df.schema["user_id"] == pl.Int64


def test_table_item_file_cast_to_interaction_dtype(tmp_path):
    f = write(tmp_path / "x.csv", "user_id,item_id,timestamp\n1,10,1\n1,11,2\n")
    items = write(tmp_path / "items.tsv", "item_id\tname\n10\tten\n11\televen\n10\tdup\n")
    raw = read_table(f, items=items)
    assert raw.items.schema["item_id"] == pl.Int64
    assert rows(raw.items, "item_id", "name") == [(10, "ten"), (11, "eleven")]  # first row per id wins


def test_table_parquet_and_datetime_column(tmp_path):
    import datetime as dt

    f = tmp_path / "events.parquet"
    pl.DataFrame({
        "user_id": [1, 1, 2],
        "item_id": ["a", "b", "a"],
        "when": [dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 2), dt.datetime(1970, 1, 1, 0, 1)],
    }).write_parquet(f)
    df = read_table(f, time_col="when").interactions
    assert df["timestamp"].to_list() == [1577836800, 1577923200, 60]


def test_table_without_time_uses_position_per_user(tmp_path):
    f = write(tmp_path / "x.csv", "user_id,item_id\n1,a\n2,b\n1,c\n1,d\n2,e\n")
    raw = read_table(f, time_col=None)
    assert rows(raw.interactions, "user_id", "item_id", "timestamp") == [
        (1, "a", 0), (2, "b", 0), (1, "c", 1), (1, "d", 2), (2, "e", 1)]
    assert raw.meta["time"] == "position"
    g = write(tmp_path / "y.csv", "user_id,item_id,timestamp\n1,a,junk\n1,b,junk\n")
    df = read_table(g, time_col=None).interactions
    assert rows(df, "timestamp", "timestamp_orig") == [(0, "junk"), (1, "junk")]


def test_table_iso_and_formatted_times(tmp_path):
    f = write(tmp_path / "iso.csv", "user_id,item_id,timestamp\n1,2,2020-01-01 00:00:10\n1,3,2020-01-02T00:00:00\n")
    assert read_table(f).interactions["timestamp"].to_list() == [1577836810, 1577923200]
    g = write(tmp_path / "eu.csv", "user_id,item_id,day\n1,2,31/12/2019\n1,3,01/01/2020\n")
    df = read_table(g, time_col="day", time_format="%d/%m/%Y").interactions
    assert df["timestamp"].to_list() == [1577750400, 1577836800]


def test_table_non_numeric_time_error(tmp_path):
    f = write(tmp_path / "x.csv", "user_id,item_id,day\n1,2,yesterday\n1,3,today\n")
    with pytest.raises(DataError) as e:
        read_table(f, time_col="day")
    msg = str(e.value)
    assert "'day'" in msg and "yesterday" in msg and "--time-format" in msg
    assert "\n" not in msg


def test_table_missing_column_error_lists_columns_and_flag(tmp_path):
    f = write(tmp_path / "x.csv", "userId,movieId,timestamp\n1,2,3\n")
    with pytest.raises(DataError) as e:
        read_table(f)
    msg = str(e.value)
    assert "no column 'user_id'" in msg and "userId, movieId, timestamp" in msg and "--user-col" in msg
    with pytest.raises(DataError, match="--item-col"):
        read_table(f, user_col="userId")
    with pytest.raises(DataError, match="--time-col"):
        read_table(f, user_col="userId", item_col="movieId", time_col="when")


def test_table_item_file_without_key_column(tmp_path):
    f = write(tmp_path / "x.csv", "user_id,item_id,timestamp\n1,2,3\n")
    items = write(tmp_path / "items.csv", "id,title\n2,x\n")
    with pytest.raises(DataError, match="--item-key"):
        read_table(f, items=items)
    assert read_table(f, items=items, item_key="id").items.rows() == [(2, "x")]


def test_table_headerless_with_positions(tmp_path):
    f = write(tmp_path / "x.csv", "5,9,100\n6,9,50\n")
    df = read_table(f, has_header=False, user_col=0, item_col="1", time_col=2).interactions
    assert rows(df, "user_id", "item_id", "timestamp") == [(5, 9, 100), (6, 9, 50)]


# ---------------------------------------------------------------------------------------------
# MovieLens
# ---------------------------------------------------------------------------------------------
def make_ml100k(d: Path) -> Path:
    write(d / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t1\t5\t881250949\n")
    flags = lambda *on: "|".join("1" if i in on else "0" for i in range(19))  # noqa: E731
    write(d / "u.item",
          f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags(3, 4, 5)}\n"
          f"242|Misérables, Les (1995)|01-Jan-1995||http://y|{flags(8)}\n"
          f"302|Café au lait (1994)|||http://z|{flags(5, 14)}\n"
          f"267|unknown||||{flags(0)}\n",
          encoding="latin-1")
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
              "Thriller", "War", "Western"]
    write(d / "u.genre", "".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n")
    write(d / "u.user", "196|49|M|writer|55105\n186|39|F|executive|00000\n")
    return d


def test_movielens_100k(tmp_path):
    d = make_ml100k(tmp_path / "ml-100k")
    raw = read_movielens_100k(d)
    assert raw.name == "ml-100k"
    assert rows(raw.interactions, "user_id", "item_id", "timestamp", "rating") == [
        (196, 242, 881250949, 3.0), (186, 302, 891717742, 3.0), (196, 1, 881250949, 5.0)]
    items = {r["item_id"]: r for r in raw.items.iter_rows(named=True)}
    assert items[242]["title"] == "Misérables, Les (1995)"
    assert items[302]["title"] == "Café au lait (1994)"
    assert items[1]["genres"] == "Animation|Children's|Comedy"
    assert items[302]["genres"] == "Comedy|Romance"
    assert items[1]["year"] == 1995 and items[302]["year"] == 1994 and items[267]["year"] is None
    users = {r["user_id"]: r for r in raw.users.iter_rows(named=True)}
    assert users[196] == {"user_id": 196, "age": 49, "gender": "M", "occupation": "writer", "zip": "55105"}
    assert users[186]["zip"] == "00000"
    # the member file and the folder are the same dataset
    assert load_raw(d / "u.data").interactions.equals(raw.interactions)
    assert detect_format(d) == "ml-100k"


def test_movielens_1m_dat(tmp_path):
    d = tmp_path / "ml-1m"
    write(d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(d / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                            "661::Amélie: The Movie (2001)::Comedy|Romance\n", encoding="latin-1")
    write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    raw = load_raw(d)
    assert raw.meta["format"] == "ml-1m"
    assert rows(raw.interactions, "user_id", "item_id", "timestamp", "rating") == [
        (1, 1193, 978300760, 5.0), (1, 661, 978302109, 3.0), (2, 1193, 978298413, 4.0)]
    assert rows(raw.items, "item_id", "title", "genres", "year") == [
        (1193, "One Flew Over the Cuckoo's Nest (1975)", "Drama", 1975),
        (661, "Amélie: The Movie (2001)", "Comedy|Romance", 2001)]
    assert rows(raw.users, "user_id", "gender", "age", "occupation", "zip") == [
        (1, "F", 1, 10, "48067"), (2, "M", 56, 16, "70072")]


def test_movielens_10m_tags_dat(tmp_path):
    d = tmp_path / "ml-10M100K"
    write(d / "ratings.dat", "5::10::3.5::1\n")
    write(d / "tags.dat", "5::10::funny::2\n6::10::funny::3\n6::10::dark::4\n")
    raw = read_movielens_dat(d / "ratings.dat")
    assert raw.interactions["rating"].to_list() == [3.5]
    assert raw.items.rows() == [(10, "funny, dark")]


def make_ml_latest(d: Path) -> Path:
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n"
                             "2,31,4.0,1260759100\n")
    write(d / "movies.csv", 'movieId,title,genres\n31,Dangerous Minds (1995),Drama\n'
                            '1029,"Dumbo, the Elephant (1941)",Animation|Children\n'
                            '5,Unrated Film,(no genres listed)\n')
    write(d / "tags.csv", "userId,movieId,tag,timestamp\n1,31,inspiring,1\n2,31,teacher,2\n3,31,inspiring,3\n"
                          "1,1029,Disney,4\n1,9999,orphan tag,5\n")
    return d


def test_movielens_latest_csv_with_tags(tmp_path):
    d = make_ml_latest(tmp_path / "ml-latest-small")
    raw = read_movielens_csv(d)
    assert raw.name == "ml-latest-small"
    assert rows(raw.interactions, "user_id", "item_id", "timestamp", "rating") == [
        (1, 31, 1260759144, 2.5), (1, 1029, 1260759179, 3.0), (2, 31, 1260759100, 4.0)]
    assert rows(raw.items, "item_id", "title", "genres", "year", "tags") == [
        (31, "Dangerous Minds (1995)", "Drama", 1995, "inspiring, teacher"),
        (1029, "Dumbo, the Elephant (1941)", "Animation|Children", 1941, "Disney"),
        (5, "Unrated Film", "(no genres listed)", None, None)]
    assert detect_format(d) == "ml-latest"
    assert detect_format(d / "ratings.csv") == "ml-latest"


# ---------------------------------------------------------------------------------------------
# Sequence files
# ---------------------------------------------------------------------------------------------
def test_sequence_file_positions(tmp_path):
    f = write(tmp_path / "Beauty.txt", "1 1 2 3\n2 4 1\n\n3 5\n")
    raw = read_sequences(f)
    assert raw.name == "Beauty"
    assert rows(raw.interactions, "user_id", "item_id", "timestamp") == [
        (1, 1, 0), (1, 2, 1), (1, 3, 2), (2, 4, 0), (2, 1, 1), (3, 5, 0)]
    assert detect_format(f) == "sequence"
    assert load_raw(f).interactions.equals(raw.interactions)


def test_sequence_with_aligned_time_file(tmp_path):
    d = tmp_path / "beauty-time"
    write(d / "Beauty_item.txt", "1 7 8 9\n2 8\n")
    write(d / "Beauty_time.txt", "1 100 100 200\n2 50\n")
    raw = load_raw(d)
    assert raw.meta == {"format": "sequence", "time": "seconds"}
    assert rows(raw.interactions, "user_id", "item_id", "timestamp") == [(1, 7, 100), (1, 8, 100), (1, 9, 200), (2, 8, 50)]
    # the item file alone finds its time file too
    item_only = load_raw(d / "Beauty_item.txt")
    assert item_only.name == "Beauty" and item_only.interactions.equals(raw.interactions)


def test_sequence_time_file_mismatch_names_the_line(tmp_path):
    d = tmp_path / "bad"
    write(d / "Beauty_item.txt", "1 7 8 9\n2 8 9\n")
    write(d / "Beauty_time.txt", "1 100 100 200\n2 50\n")
    with pytest.raises(DataError) as e:
        load_raw(d)
    msg = str(e.value)
    assert "Beauty_time.txt line 2" in msg and "Beauty_item.txt line 2" in msg and "user 2" in msg
    write(d / "Beauty_time.txt", "1 100 100 200\n")
    with pytest.raises(DataError, match="1 non-empty lines but Beauty_item.txt has 2"):
        load_raw(d)
    write(d / "Beauty_time.txt", "1 100 x 200\n2 5 6\n")
    with pytest.raises(DataError, match="line 1: 'x' is not an integer timestamp"):
        load_raw(d)


# ---------------------------------------------------------------------------------------------
# RecBole atomic files
# ---------------------------------------------------------------------------------------------
def test_recbole_atomic_files(tmp_path):
    d = tmp_path / "ml-mini"
    write(d / "ml-mini.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                               "u9\t10\t4\t881250949.0\nu8\t11\t3.5\t881250950\n")
    write(d / "ml-mini.item", "item_id:token\tmovie_title:token_seq\tgenre:token_seq\tprice:float\n"
                              "10\tToy Story\tAnimation Comedy\t9.5\n11\t\"Heat\"\tAction\t3\n")
    write(d / "ml-mini.user", "user_id:token\tage:token\tgender:token\nu9\t24\tM\n")
    raw = load_raw(d)
    assert raw.meta["format"] == "recbole" and raw.name == "ml-mini"
    df = raw.interactions
    assert df.schema["user_id"] == pl.Utf8 and df.schema["item_id"] == pl.Int64
    assert rows(df, "user_id", "item_id", "timestamp", "rating") == [("u9", 10, 881250949, 4.0), ("u8", 11, 881250950, 3.5)]
    assert raw.items.schema["movie_title"] == pl.Utf8 and raw.items.schema["price"] == pl.Float64
    assert rows(raw.items, "item_id", "movie_title", "genre") == [(10, "Toy Story", "Animation Comedy"), (11, '"Heat"', "Action")]
    assert raw.users.rows() == [("u9", "24", "M")]


def test_recbole_without_time_and_custom_item_field(tmp_path):
    f = write(tmp_path / "yelp.inter", "user_id:token\tbusiness_id:token\tstars:float\n"
                                       "a\tb1\t5\nb\tb1\t4\na\tb2\t3\n")
    raw = read_recbole(f, item_col="business_id", rating_col="stars")
    assert rows(raw.interactions, "user_id", "item_id", "timestamp", "rating") == [
        ("a", "b1", 0, 5.0), ("b", "b1", 0, 4.0), ("a", "b2", 1, 3.0)]
    with pytest.raises(DataError, match="no column 'item_id'"):
        read_recbole(f)


def test_recbole_benchmark_split_files(tmp_path):
    d = tmp_path / "bench"
    header = "user_id:token\titem_id:token\ttimestamp:float\n"
    write(d / "bench.train.inter", header + "1\t1\t10\n1\t2\t20\n")
    write(d / "bench.valid.inter", header + "1\t3\t30\n")
    write(d / "bench.test.inter", header + "1\t4\t40\n")
    raw = load_raw(d)
    assert rows(raw.interactions, "item_id", "split") == [(1, "train"), (2, "train"), (3, "valid"), (4, "test")]


def test_recbole_bad_header(tmp_path):
    f = write(tmp_path / "x.inter", "user_id\titem_id\n1\t2\n")
    with pytest.raises(DataError, match="is not 'name:type'"):
        load_raw(f)


# ---------------------------------------------------------------------------------------------
# Alibaba UserBehavior
# ---------------------------------------------------------------------------------------------
UB = "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,cart,1511561733\n2,2268318,2520377,buy,1511572885\n"


def test_userbehavior_by_name_and_by_content(tmp_path):
    named = write(tmp_path / "taobao" / "UserBehavior.csv", UB)
    raw = read_userbehavior(named.parent)
    assert raw.name == "taobao"
    assert rows(raw.interactions, "user_id", "item_id", "timestamp", "behavior", "category") == [
        (1, 2268318, 1511544070, "pv", 2520377), (1, 2333346, 1511561733, "cart", 2520771),
        (2, 2268318, 1511572885, "buy", 2520377)]
    assert raw.items.rows() == [(2268318, 2520377), (2333346, 2520771)]
    other = write(tmp_path / "log.csv", UB)
    assert detect_format(other) == "userbehavior"
    assert load_raw(other).interactions.equals(raw.interactions)


# ---------------------------------------------------------------------------------------------
# LightGCN pre-split folders
# ---------------------------------------------------------------------------------------------
def test_lightgcn_train_test(tmp_path):
    d = tmp_path / "gowalla"
    write(d / "train.txt", "0 0 1 2\n1 3\n2\n")
    write(d / "test.txt", "0 5 6\n1\n2 0\n")
    write(d / "item_list.txt", "org_id remap_id\n8975 0\n9190 1\n")
    raw = read_lightgcn(d)
    assert raw.name == "gowalla" and detect_format(d) == "lightgcn"
    assert rows(raw.interactions, "user_id", "item_id", "timestamp", "split") == [
        (0, 0, 0, "train"), (0, 1, 1, "train"), (0, 2, 2, "train"), (1, 3, 0, "train"),
        (0, 5, 3, "test"), (0, 6, 4, "test"), (2, 0, 0, "test")]
    assert raw.items.rows() == [(0, 8975), (1, 9190)]
    # the pipeline sorts by (user, timestamp): train rows of a user stay before its test rows
    ds = prepare(raw)
    first_user = ds.interactions.filter(pl.col("user_id") == 0)
    assert first_user["split"].to_list() == ["train"] * 3 + ["test"] * 2


def test_lightgcn_lastfm(tmp_path):
    d = tmp_path / "lastfm"
    write(d / "data1.txt", "424\t4076\t993\n1311\t1574\t957\n424\t10\t5\n")
    write(d / "test1.txt", "424\t121\t57\n")
    raw = load_raw(d)
    assert raw.meta["format"] == "lightgcn-lastfm"
    assert rows(raw.interactions, "user_id", "item_id", "timestamp", "rating", "split") == [
        (424, 4076, 0, 993.0, "train"), (1311, 1574, 0, 957.0, "train"), (424, 10, 1, 5.0, "train"),
        (424, 121, 2, 57.0, "test")]
    assert READERS["lightgcn-lastfm"] is read_lightgcn_lastfm


# ---------------------------------------------------------------------------------------------
# load_raw: detection, options, errors, reader_key
# ---------------------------------------------------------------------------------------------
def test_detection_of_plain_tables_and_fmt_override(tmp_path):
    f = write(tmp_path / "data.csv", "user_id,item_id,timestamp\n1,2,3\n")
    assert detect_format(f) == "table"
    seq = write(tmp_path / "seq.txt", "1 2 3\n")
    df = load_raw(seq, fmt="table", has_header=False, user_col=0, item_col=1, time_col=None, sep=" ").interactions
    assert df.rows() == [(1, 2, 0, 3)]  # the unmapped third column is kept as a side column
    with pytest.raises(DataError, match="unknown data format 'nope'"):
        load_raw(f, fmt="nope")


def test_options_for_another_format_are_refused_unless_unset(tmp_path):
    d = make_ml100k(tmp_path / "ml")
    assert load_raw(d, user_col=None).interactions.height == 3
    with pytest.raises(DataError, match="user_col do not apply to the ml-100k format"):
        load_raw(d, user_col="userId")


def test_nonexistent_path(tmp_path):
    with pytest.raises(DataError) as e:
        load_raw(tmp_path / "missing.csv")
    assert str(e.value) == (f"{tmp_path / 'missing.csv'}: no such file or directory; "
                            "give the path of a data file or dataset folder")
    with pytest.raises(DataError, match="no such file or directory"):
        reader_key(tmp_path / "nothing")


def test_unparseable_files_give_one_line_errors(tmp_path):
    bad_parquet = tmp_path / "x.parquet"
    bad_parquet.write_bytes(b"this is not parquet")
    with pytest.raises(DataError) as e:
        load_raw(bad_parquet)
    assert "cannot read it as table data" in str(e.value) and "\n" not in str(e.value)
    d = tmp_path / "ml"
    write(d / "ratings.dat", "1::2::x::y::z\n")
    with pytest.raises(DataError, match="user::item::rating::timestamp"):
        load_raw(d)
    write(d / "ratings.dat", "1::2::3::abc\n")
    with pytest.raises(DataError, match="cannot read it as ml-1m data"):
        load_raw(d)
    ragged = write(tmp_path / "r.csv", "user_id,item_id,timestamp\n1,2,3\n1,2,3,4,5\n")
    with pytest.raises(DataError, match="cannot read it as table data"):
        load_raw(ragged)
    empty = write(tmp_path / "e.csv", "user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="no interactions found"):
        load_raw(empty)


def test_folder_without_a_known_layout(tmp_path):
    write(tmp_path / "a.csv", "x\n1\n")
    write(tmp_path / "b.csv", "x\n1\n")
    write(tmp_path / "README.md", "hello")
    with pytest.raises(DataError, match="cannot tell which dataset this folder holds"):
        load_raw(tmp_path)


def test_reader_key_is_stable_and_tracks_options_and_side_files(tmp_path):
    f = write(tmp_path / "x.csv", "u,i,timestamp\n1,2,3\n")
    k1 = reader_key(f, user_col="u", item_col="i")
    assert k1 == reader_key(f, item_col="i", user_col="u")
    assert json.loads(k1)["format"] == "table"
    assert k1 != reader_key(f, user_col="u", item_col="i", time_col=None)
    d = make_ml100k(tmp_path / "ml")
    before = reader_key(d / "u.data")
    write(d / "u.item", "1|Other (2000)|||x|" + "|".join(["0"] * 19) + "\n")
    assert reader_key(d / "u.data") != before
    assert json.loads(reader_key(d))["format"] == "ml-100k"


# ---------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------
def test_describe_counts_and_text(tmp_path):
    f = write(tmp_path / "d.csv", "user_id,item_id,timestamp,behavior\n"
                                  "1,a,1577836800,pv\n1,b,1577836900,buy\n1,c,1577837000,pv\n"
                                  "2,a,1577923200,pv\n2,b,1577923300,pv\n3,a,1578009600,cart\n")
    ds = prepare(read_table(f, items=write(tmp_path / "items.csv", "item_id,title\na,A\n")))
    d = describe(ds)
    assert (d["users"], d["items"], d["interactions"]) == (3, 3, 6)
    assert d["density"] == pytest.approx(6 / 9)
    assert d["sequence_length"]["min"] == 1 and d["sequence_length"]["max"] == 3
    assert d["sequence_length"]["median"] == 2
    pop = d["item_popularity"]  # counts a=3, b=2, c=1
    assert (pop["min"], pop["max"], pop["median"]) == (1, 3, 2)
    assert pop["top20_share"] == pytest.approx(3 / 6)  # ceil(0.2 * 3) = 1 item
    assert pop["head80_items"] == 2  # 3 + 2 = 5 >= 4.8
    assert d["behaviors"] == {"pv": 4, "buy": 1, "cart": 1}
    assert d["timestamp"]["first"] == "2020-01-01" and d["timestamp"]["last"] == "2020-01-03"
    assert d["item_columns"] == ["title"] and d["user_columns"] == []
    text = format_description(d)
    assert "interactions" in text and "pv 4" in text and "2020-01-01 .. 2020-01-03" in text
    lines = text.splitlines()[1:]
    assert len({line.index(line.split("  ", 2)[-1].strip()) for line in lines[:4]}) == 1  # aligned values


def test_describe_an_item_table_without_text(tmp_path):
    """Ids-only item tables (Gowalla's item_list.txt) are described, with the reason for no text."""
    f = write(tmp_path / "d.csv", "user_id,item_id,timestamp\n1,a,1\n1,b,2\n2,a,3\n")
    ds = prepare(read_table(f, items=write(tmp_path / "items.csv", "item_id,org_id\na,10\nb,11\n")))
    d = describe(ds)
    assert d["item_text"]["items_with_text"] == 0 and "org_id" in d["item_text"]["note"]
    assert "item text      - (none:" in format_description(d)
    with pytest.raises(DataError, match="text template"):
        describe(ds, template="{title}")  # a template the user names must fit the table


# ---------------------------------------------------------------------------------------------
# The real datasets beside the project (skipped when absent)
# ---------------------------------------------------------------------------------------------
def shared(sub: str) -> Path:
    p = SHARED / sub
    if not p.exists():
        pytest.skip(f"real dataset {p} not present (the shared data folder sits beside the project)")
    return p


def test_real_amazon_beauty_sequences():
    raw = load_raw(shared("amazon-beauty/Beauty.txt"))
    df = raw.interactions
    assert raw.name == "Beauty" and raw.meta["format"] == "sequence"
    assert (df["user_id"].n_unique(), df["item_id"].n_unique(), df.height) == (22363, 12101, 198502)
    assert rows(df.head(3), "user_id", "item_id", "timestamp") == [(1, 1, 0), (1, 2, 1), (1, 3, 2)]


def test_real_movielens_100k():
    raw = load_raw(shared("movielens-100k"))
    df = raw.interactions
    assert (df["user_id"].n_unique(), df["item_id"].n_unique(), df.height) == (943, 1682, 100000)
    assert raw.items.height == 1682 and raw.users.height == 943
    assert raw.items.filter(pl.col("item_id") == 1)["title"].item() == "Toy Story (1995)"


def test_real_movielens_latest_small():
    raw = load_raw(shared("movielens-latest-small"))
    assert raw.meta["format"] == "ml-latest"
    assert raw.interactions.height == 100004 and raw.interactions["user_id"].n_unique() == 671
    assert "tags" in raw.items.columns


def test_real_gowalla_split():
    raw = load_raw(shared("gowalla"))
    counts = dict(raw.interactions.group_by("split").len().rows())
    assert counts == {"train": 810128, "test": 217242}


def test_real_taobao_sample():
    raw = load_raw(shared("taobao-userbehavior-sample"))
    df = raw.interactions
    assert df.height == 84475 and df["user_id"].n_unique() == 815
    assert dict(df.group_by("behavior").len().rows()) == {"pv": 75872, "cart": 4497, "fav": 2356, "buy": 1750}


def test_real_amazon_beauty_time_is_aligned():
    raw = load_raw(shared("amazon-beauty-time"))
    df = raw.interactions
    assert raw.meta["time"] == "seconds"
    assert df.height == 198502 and df["user_id"].n_unique() == 22363
    assert df["timestamp"].min() > 10**8


def test_real_lastfm_split():
    raw = load_raw(shared("lastfm-social"))
    assert dict(raw.interactions.group_by("split").len().rows()) == {"train": 42135, "test": 10533}


def _tagged_latest(tmp_path, tags: str = "1,40,spoiler-ending,9\n2,10,twist,9\n1,10,slow,9\n"):
    """A tiny ML-latest folder (users 1 and 2 rate movies 10-40 in opposite orders, so each holds
    out a different pair) with the tag rows ``tags`` (user 1 tags 40, user 2 tags 10: their test
    items)."""
    d = tmp_path / "ml-latest-small"
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n"
                             + "".join(f"1,{m},4.0,{t}\n" for t, m in enumerate((10, 20, 30, 40)))
                             + "".join(f"2,{m},4.0,{t}\n" for t, m in enumerate((40, 30, 20, 10))))
    write(d / "movies.csv", "movieId,title,genres\n10,A (1990),Drama\n20,B (1991),Drama\n"
                            "30,C (1992),Drama\n40,D (1993),Drama\n")
    write(d / "tags.csv", "userId,movieId,tag,timestamp\n" + tags)
    return d


def test_item_tags_lose_the_held_out_pairs_tags_once_split(tmp_path):
    """A user's tag on their own held-out movie never reaches the item text; other users' tags
    on it, and the user's tags on training movies, stay."""
    from recforge.pipeline import load_dataset, split_dataset
    from recforge.semantic.text import item_texts

    # user 1 holds out 30 (validation) and 40 (test); user 2 holds out 20 and 10
    d = _tagged_latest(tmp_path, "1,40,spoiler-ending,9\n2,40,classic,9\n1,10,slow,9\n2,10,twist,9\n"
                                 "1,30,cult,9\n3,20,noir,9\n")
    data = {"path": str(d), "cache": False}
    ds = load_dataset(data)
    code = dict(zip(ds.item_map["raw"].cast(pl.Utf8).to_list(), ds.item_map["idx"].to_list()))
    tags = lambda: dict(zip(ds.items["item_id"].to_list(), ds.items["tags"].to_list()))  # noqa: E731
    assert "spoiler-ending" in tags()[code["40"]]  # the reader keeps every user's tags
    split = split_dataset(ds, {"data": data, "split": {"method": "loo"}})
    after = tags()
    assert after[code["40"]] == "classic" and after[code["10"]] == "slow"  # user 2 held out 10
    assert after[code["30"]] is None and after[code["20"]] == "noir"  # user 3 rated nothing: kept
    assert split.protocol["item_tags"]["dropped_held_out_pairs"] == 3
    texts = item_texts(ds)
    assert not any("spoiler" in t or "cult" in t or "twist" in t for t in texts)
    split_dataset(ds, {"data": data, "split": {"method": "loo"}})  # rebuilt from the file: same column
    assert tags() == after


def test_precomputed_table_with_held_out_tags_is_refused(tmp_path):
    """A table written by 'recforge embed' on the unsplit data carries the tags users put on their
    test items; a text model trained on a split of that data refuses it with the fix, and a table
    without the tags field is accepted."""
    from recforge.errors import DataError
    from recforge.models.registry import create
    from recforge.pipeline import load_dataset, split_dataset
    from recforge.semantic.store import semantic_table

    data = {"path": str(_tagged_latest(tmp_path)), "cache": False}
    ds = load_dataset(data)
    leaky = semantic_table(ds, "hashing:16")
    assert any("spoiler" in t for t in leaky.texts)
    leaky.save(tmp_path / "leaky.parquet")
    clean = semantic_table(ds, "hashing:16", template="{title}. Genres: {genres}")
    clean.save(tmp_path / "clean.parquet")
    split = split_dataset(ds, {"data": data, "split": {"method": "loo"}})

    model = create("llmesr", semantic_table=str(tmp_path / "leaky.parquet"), verbose=False)
    model.attach_dataset(ds)
    with pytest.raises(DataError, match="held-out items.*recforge embed DATA --template"):
        model.load_semantic(split.n_items)
    model = create("llmesr", semantic_table=str(tmp_path / "clean.parquet"), verbose=False)
    model.attach_dataset(ds)
    assert model.load_semantic(split.n_items).shape == (split.n_items + 1, 16)


def test_language_model_task_drops_the_test_pairs_tags(tmp_path):
    """The language-model task's own split (no validation part) removes the tags users gave to
    their test items before the retrieval vectors read the item text."""
    from recforge.llm import task
    from recforge.semantic.text import item_texts

    cfg = task.resolve("lr", str(_tagged_latest(tmp_path)), {"data.cache": False, "split.test_ratio": 0.25,
                                                              "data.min_history": 1})
    ds, split, _, record = task.prepare(cfg)
    held = set(zip(split.test["user_id"].to_list(), split.test["item_id"].to_list()))
    assert len(held) == 2  # each user's last movie: user 1's 40, user 2's 10
    assert record["split"]["item_tags"]["dropped_held_out_pairs"] == 2
    texts = " ".join(item_texts(ds))
    assert "spoiler" not in texts and "twist" not in texts and "slow" in texts
