"""Commands: what the source has executed (``INFO commandstats``) against what the target knows.

The target's own ``COMMAND`` reply is the authority on what it can run, subcommands included
(``client|setname``); the source's ``COMMAND DOCS`` says since when a missing command exists.
A short table adds behaviour differences the command tables cannot show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from migrator.compat.model import FAIL, PASS, WARN, Check
from migrator.compat.probe import Probe
from migrator.compat.rpc import Side, Unavailable, pairs, text

_LISTED = 12  # names shown in one line of evidence

# What any client (migrator's own included) sends on connecting, and the reset itself:
# statistics holding nothing else say nothing about the application.
CONNECTION_SETUP = frozenset({"ping", "hello", "auth", "select", "client|setinfo", "client|setname", "info",
                              "config|resetstat"})


@dataclass(frozen=True)
class CommandSpec:
    name: str
    categories: frozenset[str]
    tips: frozenset[str]
    subcommands: dict[str, "CommandSpec"] = field(default_factory=dict, hash=False)


def parse_spec(entry: list) -> CommandSpec:
    """One element of a raw ``COMMAND`` reply (Redis 6.0+ has categories, 7.0+ tips and subcommands)."""
    cats = frozenset(text(c).lstrip("@").lower() for c in entry[6]) if len(entry) > 6 else frozenset()
    tips = frozenset(text(t).split(":")[0].lower() for t in entry[7]) if len(entry) > 7 else frozenset()
    subs = {s.name: s for s in map(parse_spec, entry[9])} if len(entry) > 9 and entry[9] else {}
    return CommandSpec(text(entry[0]).lower(), cats, tips, subs)


def command_table(side: Side) -> dict[str, CommandSpec]:
    return {s.name: s for s in map(parse_spec, side.call("COMMAND", raw=True))}


def lookup(table: dict[str, CommandSpec], name: str) -> CommandSpec | None:
    """The spec of ``get`` or ``client|setname``; a container without listed subcommands stands for them all."""
    base, _, _sub = name.partition("|")
    spec = table.get(base)
    if spec is None or name == base or not spec.subcommands:
        return spec
    return spec.subcommands.get(name)


def target_table(probe: Probe) -> dict[str, CommandSpec]:
    return probe.memo("commands:target", lambda: command_table(probe.target))


def _since(source: Side, names: list[str]) -> dict[str, str]:
    """{"hexpire": "since 7.4.0"} from the source's COMMAND DOCS (empty where it has none)."""
    bases = sorted({n.partition("|")[0] for n in names})
    try:
        reply = source.call("COMMAND", "DOCS", *bases, raw=True)
    except Unavailable:
        return {}
    out = {}
    for name, doc in pairs(reply):
        fields = {text(k): v for k, v in pairs(doc)} if isinstance(doc, (list, dict)) else {}
        if "since" in fields:
            out[text(name).lower()] = f"since {text(fields['since'])}"
    return out


def _calls(n: int) -> str:
    return f"{n} call{'s' if n != 1 else ''}"


def missing_commands_check(probe: Probe) -> Check:
    """Every command the source has executed must exist on the target."""
    table = target_table(probe)
    executed = probe.commandstats
    missing = sorted(n for n in executed if lookup(table, n) is None)
    own = probe.own_calls
    data = {"executed": executed, "missing": missing, "migrator_calls_left_out": own}
    if not set(executed) - CONNECTION_SETUP:
        return Check("commands.missing", "Commands the target lacks", WARN,
                     "INFO commandstats on the source shows only connection setup "
                     f"({', '.join(sorted(executed)) or 'nothing'}): statistics were reset, or no application ran",
                     "run the check again after the application has run its usual workload on the source", data)
    if not missing:
        left_out = f" (migrator's own {sum(own.values()):,} calls left out)" if own else ""
        return Check("commands.missing", "Commands the target lacks", PASS,
                     f"all {len(executed)} commands the source executed exist on the target{left_out}", "", data)
    since = _since(probe.source, missing)
    shown = ", ".join(f"{n} ({_calls(executed[n])}{', ' + since[n] if n in since else ''})" for n in missing[:_LISTED])
    more = f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
    return Check("commands.missing", "Commands the target lacks", FAIL,
                 f"{len(missing)} of {len(executed)} commands the source executed do not exist on the target "
                 f"{probe.target_id.label}: {shown}{more}",
                 "use a target version that has these commands, or change the application to stop using them "
                 "before migrating (the shim would get errors from the target for them)", data)


# Executed commands whose behaviour differs between Redis and Valkey: (severity, note).
DIFFERENCES: dict[str, tuple[str, str]] = {
    "info": (PASS, "Valkey pins redis_version:7.2.4, adds server_name/valkey_version and says server_mode, "
                   "not redis_mode: code that parses INFO for the version must read valkey_version"),
    "hello": (PASS, "the server field is 'valkey' on Valkey 8+"),
    "eval": (WARN, "scripts cached on the source are not on the target: EVALSHA answers NOSCRIPT until reloaded"),
    "evalsha": (WARN, "EVALSHA answers NOSCRIPT on the target until the client loads the script there"),
    "evalsha_ro": (WARN, "EVALSHA_RO answers NOSCRIPT on the target until the client loads the script there"),
    "script|load": (WARN, "scripts loaded on the source must be loaded on the target too"),
    "object|encoding": (WARN, "encodings differ (Valkey 8.1's new hashtable): code must not depend on them"),
    "memory|usage": (WARN, "memory accounting differs: sizes are not comparable across servers"),
    "debug": (WARN, "DEBUG subcommands differ and are disabled on most managed services"),
    "config|set": (WARN, "some parameters differ between Redis and Valkey (see the configuration check)"),
    "config|get": (PASS, "some parameters differ between Redis and Valkey (see the configuration check)"),
    "client|list": (PASS, "the fields listed differ between versions: parse by name, not position"),
    "sync": (WARN, "replication between Redis and Valkey works in one direction only (see data format)"),
    "psync": (WARN, "replication between Redis and Valkey works in one direction only (see data format)"),
    "replicaof": (WARN, "replication between Redis and Valkey works in one direction only (see data format)"),
    "slaveof": (WARN, "replication between Redis and Valkey works in one direction only (see data format)"),
}


def behaviour_check(probe: Probe) -> Check:
    """Executed commands with known behaviour differences warn; nondeterministic ones are noted for the shim."""
    table = target_table(probe)
    executed = probe.commandstats
    notes = {n: DIFFERENCES[n] for n in sorted(executed) if n in DIFFERENCES}
    nondeterministic = sorted(n for n in executed if (s := lookup(table, n)) and "nondeterministic_output" in s.tips)
    warned = {n: note for n, (sev, note) in notes.items() if sev == WARN}
    data = {"differences": {n: {"severity": s, "note": t} for n, (s, t) in notes.items()},
            "nondeterministic": nondeterministic}
    tail = (f"; replies that differ run to run by design (the shim's read comparison cannot match them): "
            f"{', '.join(nondeterministic[:_LISTED])}" if nondeterministic else "")
    if warned:
        return Check("commands.behaviour", "Commands that behave differently", WARN,
                     "; ".join(f"{n}: {t}" for n, t in warned.items()) + tail,
                     "review these uses in the application and cover them in steps.compatibility.test_command", data)
    noted = "; ".join(f"{n}: {t}" for n, (_s, t) in notes.items())
    return Check("commands.behaviour", "Commands that behave differently", PASS,
                 (noted or "no executed command has a known behaviour difference") + tail, "", data)
