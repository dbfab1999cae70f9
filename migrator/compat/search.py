"""RediSearch indexes: not data, so nothing copies them; compat prints how to recreate each.

An index (``FT.CREATE``) lives beside the keys it indexes: SCAN never returns it, DUMP/RESTORE
and ``sync`` never carry it, and a target without it answers ``FT.SEARCH`` with an unknown
index. ``FT._LIST`` names the source's indexes and ``FT.INFO`` describes each; ``ft_create``
turns that description back into the ``FT.CREATE`` command that makes the same index (key type,
prefixes, filter, language, score, options, stopwords and every attribute with its type and
flags). It is a pure function of the reply, RESP2 (flat lists) or RESP3 (maps) alike.
Not carried: aliases (``FT.ALIASADD``), synonym groups (``FT.SYNUPDATE``), dictionaries
(``FT.DICTADD``) and the index's ``TEMPORARY`` lifetime, which ``FT.INFO`` does not show.
"""

from __future__ import annotations

from typing import Any

import redis

from migrator.compat.commands import lookup, target_table
from migrator.compat.model import FAIL, PASS, WARN, Check
from migrator.compat.modules import module_names
from migrator.compat.probe import Probe
from migrator.compat.rpc import Unavailable, text

TITLE = "RediSearch indexes"

# Attribute fields of FT.INFO that carry a value, with the FT.CREATE word that sets it; any
# other bare word in a RESP2 attribute is a flag (SORTABLE, NOSTEM, CASESENSITIVE, ...).
_VALUED = {"identifier": None, "attribute": None, "type": None, "weight": "WEIGHT", "separator": "SEPARATOR",
           "phonetic": "PHONETIC", "coord_system": "COORD_SYSTEM"}
# Vector attributes: FT.INFO's name → FT.CREATE's parameter.
_VECTOR = {"data_type": "TYPE", "dim": "DIM", "distance_metric": "DISTANCE_METRIC", "m": "M",
           "ef_construction": "EF_CONSTRUCTION", "ef_runtime": "EF_RUNTIME", "epsilon": "EPSILON",
           "initial_cap": "INITIAL_CAP", "block_size": "BLOCK_SIZE"}
# Flags FT.CREATE takes only on some types: UNF is implied for NUMERIC and GEO.
_SKIP_FLAGS = {"NUMERIC": {"UNF"}, "GEO": {"UNF"}}


def _as_map(reply: Any) -> dict[str, Any]:
    """A RESP3 map or a RESP2 flat [name, value, ...] list as {name: value} (names as str)."""
    if isinstance(reply, dict):
        return {text(k): v for k, v in reply.items()}
    items = list(reply or [])
    return {text(k): v for k, v in zip(items[::2], items[1::2])}


def _attribute(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """One attribute of FT.INFO as (valued fields with lower-case names, flags)."""
    if isinstance(raw, dict):
        fields = {text(k).lower(): v for k, v in raw.items() if text(k).lower() != "flags"}
        flags = [text(f) for f in raw.get(b"flags", raw.get("flags", [])) or []]
        return fields, flags
    fields, flags = {}, []
    items = list(raw)
    i = 0
    while i < len(items):
        name = text(items[i])
        low = name.lower()
        if (low in _VALUED or low in _VECTOR or low == "algorithm") and i + 1 < len(items):
            fields[low] = items[i + 1]
            i += 2
        else:
            flags.append(name)
            i += 1
    return fields, flags


def _num(v: Any) -> str:
    """A number as FT.CREATE takes it: 2.0 → 2, 0.5 → 0.5."""
    try:
        f = float(text(v))
    except ValueError:
        return text(v)
    return str(int(f)) if f.is_integer() else repr(f)


def _schema_field(raw: Any) -> list[str]:
    fields, flags = _attribute(raw)
    identifier, attribute = text(fields.get("identifier", "")), text(fields.get("attribute", ""))
    kind = text(fields.get("type", "")).upper()
    out = [identifier]
    if attribute and attribute != identifier:
        out += ["AS", attribute]
    out.append(kind)
    if kind == "VECTOR":
        params: list[str] = []
        for name, word in _VECTOR.items():
            if name in fields:
                params += [word, text(fields[name]) if name in ("data_type", "distance_metric") else _num(fields[name])]
        out += [text(fields.get("algorithm", "FLAT")).upper(), str(len(params)), *params]
    if "weight" in fields and float(text(fields["weight"])) != 1.0:
        out += ["WEIGHT", _num(fields["weight"])]
    if "separator" in fields and text(fields["separator"]) not in (",", ""):  # "" on JSON tags: none
        out += ["SEPARATOR", text(fields["separator"])]
    for name in ("phonetic", "coord_system"):
        if name in fields:
            out += [name.upper(), text(fields[name])]
    skip = _SKIP_FLAGS.get(kind, set())
    order = ["NOSTEM", "CASESENSITIVE", "WITHSUFFIXTRIE", "INDEXEMPTY", "INDEXMISSING", "SORTABLE", "UNF", "NOINDEX"]
    given = [f.upper() for f in flags if f.upper() not in skip]
    # SORTABLE must precede UNF, and NOINDEX comes last: FT.CREATE is strict about the order.
    out += sorted(given, key=lambda f: order.index(f) if f in order else -1)
    return out


def ft_create(name: str, info: Any) -> list[str]:
    """The ``FT.CREATE`` arguments that recreate index ``name`` from its ``FT.INFO`` reply."""
    top = _as_map(info)
    definition = _as_map(top.get("index_definition"))
    cmd = ["FT.CREATE", name, "ON", text(definition.get("key_type", "HASH")).upper()]
    prefixes = [text(p) for p in definition.get("prefixes") or []]
    if prefixes and prefixes != [""]:
        cmd += ["PREFIX", str(len(prefixes)), *prefixes]
    for key, word in (("filter", "FILTER"), ("default_language", "LANGUAGE"), ("language_field", "LANGUAGE_FIELD")):
        if definition.get(key) not in (None, b"", ""):
            cmd += [word, text(definition[key])]
    if "default_score" in definition and float(text(definition["default_score"])) != 1.0:
        cmd += ["SCORE", _num(definition["default_score"])]
    for key, word in (("score_field", "SCORE_FIELD"), ("payload_field", "PAYLOAD_FIELD")):
        if definition.get(key) not in (None, b"", ""):
            cmd += [word, text(definition[key])]
    options = [text(o).upper() for o in top.get("index_options") or []]
    if "NOOFFSETS" in options:  # implies NOHL, which FT.INFO lists too
        options = [o for o in options if o != "NOHL"]
    cmd += options
    if "stopwords_list" in top:
        words = [text(w) for w in top["stopwords_list"] or []]
        cmd += ["STOPWORDS", str(len(words)), *words]
    cmd.append("SCHEMA")
    for raw in top.get("attributes") or []:
        cmd += _schema_field(raw)
    return cmd


def quote(args: list[str]) -> str:
    """A command line valkey-cli reads back as the same arguments (at its prompt): anything
    but letters, digits and ``_:.-`` is double-quoted."""
    def one(a: str) -> str:
        if a and all(c.isalnum() or c in "_:.-" for c in a):
            return a
        return '"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return " ".join(one(a) for a in args)


def index_names(probe: Probe) -> list[str] | None:
    """The source's indexes; None when it has no search module (FT._LIST unknown, and no search
    module listed: a renamed FT._LIST on a server with RediSearch stays "could not check")."""
    try:
        reply = probe.source.call("FT._LIST", raw=True)
    except Unavailable as e:
        if "unknown command" not in e.reason.lower():
            raise
        try:
            loaded = "search" in module_names(probe, "source")
        except Unavailable:
            loaded = False
        if loaded:
            raise
        return None
    return sorted(text(n) for n in (reply or []))


def _target_indexes(probe: Probe, names: list[str]) -> dict[str, str]:
    """The FT.CREATE of each of ``names`` already on the target (none where it cannot tell)."""
    try:
        present = {text(n) for n in probe.target.call("FT._LIST", raw=True) or []}
        return {n: quote(ft_create(n, probe.target.call("FT.INFO", n, raw=True))) for n in names if n in present}
    except (Unavailable, redis.exceptions.ResponseError):  # e.g. a search module whose FT.INFO differs
        return {}


def search_indexes_check(probe: Probe) -> Check | None:
    """Each index on the source, with the FT.CREATE that recreates it on the target; passes once the
    target has every one with the same definition."""
    names = index_names(probe)
    if not names:
        return None
    commands = {n: quote(ft_create(n, probe.source.call("FT.INFO", n, raw=True))) for n in names}
    try:
        target_has = lookup(target_table(probe), "ft.create") is not None
    except Unavailable:
        target_has = None
    on_target = _target_indexes(probe, names) if target_has is not False else {}
    same = [n for n in names if on_target.get(n) == commands[n]]
    differ = [n for n in names if n in on_target and n not in same]
    todo = [n for n in names if n not in same]
    data = {"indexes": [{"name": n, "ft_create": c, "on_target": "same" if n in same else "differs" if n in differ
                         else "missing"} for n, c in commands.items()]}
    listed = ", ".join(names)
    if not todo:
        return Check("search.indexes", TITLE, PASS, f"{len(names)} RediSearch index(es) on the source ({listed}): "
                     "each is on the target with the same definition", "", data)
    evidence = (f"{len(names)} RediSearch index(es) on the source ({listed}): an index is not data, and no copy "
                f"carries it; {len(todo)} must be recreated on the target, which then indexes the copied keys")
    if differ:
        evidence += f"; on the target with another definition: {', '.join(differ)}"
    fix = ("run on the target, before it serves reads" + (" (after FT.DROPINDEX of those that differ)" if differ else "")
           + ": " + " ; ".join(commands[n] for n in todo)
           + " (aliases, synonyms and dictionaries are not included: recreate those too)")
    if target_has is False:
        return Check("search.indexes", TITLE, FAIL, evidence + "; the target has no FT.CREATE",
                     "load valkey-search on the target (check that it supports these field types), then " + fix, data)
    return Check("search.indexes", TITLE, WARN, evidence, fix, data)
