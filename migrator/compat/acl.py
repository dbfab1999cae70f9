"""ACL users and requirepass: every source user must exist on the target with the same rules.

Rules are compared by what they allow, not by how they are written: Redis drops redundant
rules from ``ACL LIST`` (``-@all +get -flushall`` shows as ``-@all +get``) while Valkey keeps
them, so command rules are evaluated against the target's command table. Passwords are
compared as sets of SHA-256 hashes and never shown; only their presence is ever reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from migrator.compat.commands import CommandSpec, target_table
from migrator.compat.config import read_config
from migrator.compat.model import FAIL, PASS, WARN, Check
from migrator.compat.probe import Probe
from migrator.compat.rpc import Unavailable, text

_IGNORED_FLAGS = frozenset({"sanitize-payload", "skip-sanitize-payload"})  # Valkey 8.1 shows one by default
_TOKEN = re.compile(r"\([^)]*\)|\S+")


@dataclass
class AclUser:
    name: str
    enabled: bool = False
    nopass: bool = False
    hashes: frozenset[str] = frozenset()  # never printed
    keys: frozenset[str] = frozenset()
    channels: frozenset[str] = frozenset()
    commands: tuple[str, ...] = ()
    selectors: frozenset[str] = frozenset()
    flags: frozenset[str] = frozenset()
    rules_text: str = ""  # the ACL LIST line with password hashes masked

    def to_json(self) -> dict:
        return {"name": self.name, "rules": self.rules_text}


def parse_acl_line(line: str) -> AclUser:
    """One ``ACL LIST`` line: ``user <name> <rules...>``."""
    tokens = _TOKEN.findall(line)
    if len(tokens) < 2 or tokens[0] != "user":
        raise ValueError(f"not an ACL LIST line: {mask(line)!r}")
    u = AclUser(tokens[1])
    hashes, keys, channels, commands, selectors, flags = set(), set(), set(), [], set(), set()
    for tok in tokens[2:]:
        if tok in ("on", "off"):
            u.enabled = tok == "on"
        elif tok == "nopass":
            u.nopass = True
        elif tok.startswith("#"):
            hashes.add(tok[1:])
        elif tok == "allkeys" or tok.startswith("~") or re.match(r"%R?W?~", tok):
            keys.add("~*" if tok == "allkeys" else tok)
        elif tok == "resetkeys":
            keys.clear()
        elif tok == "allchannels" or tok.startswith("&"):
            channels.add("&*" if tok == "allchannels" else tok)
        elif tok == "resetchannels":
            channels.clear()
        elif tok[0] in "+-" or tok in ("allcommands", "nocommands"):
            commands.append({"allcommands": "+@all", "nocommands": "-@all"}.get(tok, tok.lower()))
        elif tok.startswith("("):
            selectors.add(" ".join(sorted(tok[1:-1].split())))
        elif tok not in _IGNORED_FLAGS:
            flags.add(tok)
    u.hashes, u.keys, u.channels = frozenset(hashes), frozenset(keys), frozenset(channels)
    u.commands, u.selectors, u.flags = tuple(commands), frozenset(selectors), frozenset(flags)
    u.rules_text = mask(line)
    return u


def mask(line: str) -> str:
    return re.sub(r"#[0-9a-fA-F]{16,}", "#<hash>", re.sub(r"(?<=\s)>\S+", ">***", line))


def units(table: dict[str, CommandSpec]) -> dict[str, frozenset[str]]:
    """What ACLs grant, with categories: each command, or each subcommand of a container."""
    out = {}
    for spec in table.values():
        if spec.subcommands:
            out.update({s.name: s.categories for s in spec.subcommands.values()})
        else:
            out[spec.name] = spec.categories
    return out


def allowed(rules: tuple[str, ...], universe: dict[str, frozenset[str]]) -> frozenset[str]:
    """The commands ``rules`` allow, applied in order as the server does."""
    granted: set[str] = set()
    for rule in rules:
        sign, what = rule[0], rule[1:]
        if what.startswith("@"):
            cat = what[1:]
            hit = set(universe) if cat == "all" else {u for u, cats in universe.items() if cat in cats}
        else:
            hit = {u for u in universe if u == what or u.startswith(what + "|")}
        granted = granted | hit if sign == "+" else granted - hit
    return frozenset(granted)


def differences(src: AclUser, dst: AclUser, universe: dict[str, frozenset[str]]) -> list[str]:
    """How the target's user differs from the source's (no password or hash in the text)."""
    out = []
    if src.enabled != dst.enabled:
        out.append(f"{'enabled' if src.enabled else 'disabled'} on the source only")
    if src.nopass != dst.nopass or src.hashes != dst.hashes:
        out.append("passwords differ (values not shown)")
    for what, a, b in (("key patterns", src.keys, dst.keys), ("channel patterns", src.channels, dst.channels),
                       ("selectors", src.selectors, dst.selectors), ("flags", src.flags, dst.flags)):
        if a != b:
            out.append(f"{what} differ (source {' '.join(sorted(a)) or 'none'}, target {' '.join(sorted(b)) or 'none'})")
    a, b = allowed(src.commands, universe), allowed(dst.commands, universe)
    if a != b:
        only_src, only_dst = sorted(a - b), sorted(b - a)
        part = []
        if only_src:
            part.append(f"source only: {', '.join(only_src[:8])}{' ...' if len(only_src) > 8 else ''}")
        if only_dst:
            part.append(f"target only: {', '.join(only_dst[:8])}{' ...' if len(only_dst) > 8 else ''}")
        out.append("commands allowed differ (" + "; ".join(part) + ")")
    return out


def acl_users(probe: Probe, role: str) -> dict[str, AclUser]:
    return {u.name: u for u in (parse_acl_line(text(line)) for line in probe.side(role).call("ACL", "LIST"))}


def acl_check(probe: Probe) -> Check:
    source, target = acl_users(probe, "source"), acl_users(probe, "target")
    universe = units(target_table(probe))
    missing = sorted(set(source) - set(target))
    differ = {n: d for n in sorted(set(source) & set(target)) if (d := differences(source[n], target[n], universe))}
    data = {"source_users": sorted(source), "target_users": sorted(target), "missing": missing, "differ": differ}
    if not missing and not differ:
        return Check("acl", "ACL users", PASS, f"all {len(source)} source user(s) exist on the target with the same "
                     f"rules ({', '.join(sorted(source))})", "", data)
    parts = [f"missing on the target: {', '.join(missing)}"] if missing else []
    parts += [f"{n}: {'; '.join(d)}" for n, d in differ.items()]
    fixes = [f"on the target: ACL SETUSER {source[n].rules_text.split(' ', 1)[-1]} (#<hash> is the source's "
             "password hash: copy it from the source's ACL LIST)" for n in missing]
    if differ:
        fixes.append("make the target's users match the source's (ACL SETUSER ... reset, then the source's rules)")
    refused = missing + [n for n, d in differ.items() if any(x.startswith(("passwords differ", "enabled on")) for x in d)]
    if refused:
        # (shim.auth: passthrough logs each client in on both servers: see docs/shim.md.)
        fixes.append(f"until then, with shim.auth: passthrough the shim refuses the login of {', '.join(refused)} "
                     "in mirroring, reads-on-target and writes-on-target")
    return Check("acl", "ACL users", FAIL, "; ".join(parts), "; ".join(fixes), data)


def _requirepass_set(probe: Probe, role: str) -> bool:
    """Whether the server asks for a password: CONFIG where allowed, else the default user's ACL."""
    try:
        return read_config(probe, role).get("requirepass") == "set"
    except Unavailable:
        default = acl_users(probe, role).get("default")
        return bool(default and default.enabled and not default.nopass)


def auth_check(probe: Probe) -> Check:
    s, t = _requirepass_set(probe, "source"), _requirepass_set(probe, "target")
    data = {"source_requirepass": s, "target_requirepass": t}
    said = {True: "set", False: "not set"}
    evidence = f"requirepass {said[s]} on the source, {said[t]} on the target (values never read into the report)"
    if s and not t:
        return Check("auth", "Password (requirepass)", FAIL, evidence + ": the target would accept clients the source refuses",
                     "set requirepass on the target (CONFIG SET requirepass, and in its config file)", data)
    if t and not s:
        return Check("auth", "Password (requirepass)", WARN, evidence + ": clients will need a password after the cutover",
                     "give the applications the target's password before the write cutover, or unset it", data)
    return Check("auth", "Password (requirepass)", PASS, evidence, "", data)
