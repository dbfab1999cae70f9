"""The compatibility checks' pure logic: RDB acceptance, module and type mapping, ACL evaluation, verdicts."""

from __future__ import annotations

import pytest

from migrator.compat.acl import allowed, mask, parse_acl_line
from migrator.compat.identify import identify
from migrator.compat.model import FAIL, PASS, UNKNOWN, WARN, Check, verdict
from migrator.compat.modules import compare_modules, odd_types
from migrator.compat.rdb import accepts, payload_version, written_version

VALKEY_81 = identify({"server_name": "valkey", "valkey_version": "8.1.8", "redis_version": "7.2.4", "server_mode": "standalone"})
VALKEY_91 = identify({"server_name": "valkey", "valkey_version": "9.1.2", "redis_version": "7.2.4"})
REDIS_70 = identify({"redis_version": "7.0.15", "redis_mode": "standalone"})


def test_identify_never_trusts_redis_version_alone():
    """A Valkey is recognised by server_name/valkey_version even though it says redis_version:7.2.4."""
    assert (VALKEY_81.kind, VALKEY_81.version, VALKEY_81.mode) == ("valkey", "8.1.8", "standalone")
    assert (REDIS_70.kind, REDIS_70.version) == ("redis", "7.0.15")
    assert identify({"redis_version": "7.2.4", "valkey_version": "7.2.5"}).kind == "valkey"


def test_written_versions_follow_the_matrix():
    """The RDB version table gives 10 for Redis 7.0, 11 for Valkey 8.1 and 80 for Valkey 9.1."""
    assert (written_version(REDIS_70), written_version(VALKEY_81), written_version(VALKEY_91)) == (10, 11, 80)
    assert written_version(identify({"redis_version": "8.6.0"})) == 13


@pytest.mark.parametrize("target,own,payload,relaxed,ok", [
    (VALKEY_81, 11, 10, False, True),   # Redis 7.0 → Valkey 8.1
    (VALKEY_81, 11, 12, False, False),  # Redis 7.4 → Valkey 8.1 (strict)
    (VALKEY_81, 11, 12, True, True),    # ... relaxed loads it
    (VALKEY_91, 80, 12, False, False),  # Redis 7.4 format is foreign to Valkey 9 in strict mode
    (VALKEY_91, 80, 11, False, True),
    (REDIS_70, 10, 11, False, False),   # Valkey 8.1 → Redis 7.0: the rollback direction
    (REDIS_70, 10, 80, True, False),    # no Redis reads Valkey 9's format
])
def test_rdb_acceptance(target, own, payload, relaxed, ok):
    """accepts() predicts RESTORE's verdict for each pair in the reference matrix."""
    assert accepts(target, own, payload, relaxed)[0] is ok


def test_payload_version_reads_the_footer():
    """The RDB version is the 2 little-endian bytes before the 8-byte CRC."""
    assert payload_version(b"\x00\x01v" + (80).to_bytes(2, "little") + b"\x00" * 8) == 80
    with pytest.raises(ValueError):
        payload_version(b"short")


def test_module_mapping_passes_replacements_and_fails_the_rest():
    """RedisJSON passes when valkey-json (json) is loaded; TimeSeries and unknown modules fail with advice."""
    rows = {f.what: f for f in compare_modules({"rejson", "timeseries", "custom"}, {"json"})}
    assert rows["rejson"].status == PASS
    assert rows["timeseries"].status == FAIL and "no Valkey module" in rows["timeseries"].fix
    assert rows["custom"].status == FAIL and rows["custom"].fix


def test_module_types_fail_without_a_module_and_pass_json_with_one():
    """Sampled ReJSON-RL data passes when the target loads json (copied type-aware) and fails when it does not; vector sets always fail."""
    types = {"string": 5, "ReJSON-RL": 2, "vectorset": 1}
    with_json = {f.what.split()[1]: f.status for f in odd_types(types, {"json"})}
    without = {f.what.split()[1]: f.status for f in odd_types(types, set())}
    assert with_json == {"ReJSON-RL": PASS, "vectorset": FAIL}
    assert without == {"ReJSON-RL": FAIL, "vectorset": FAIL}


UNIVERSE = {"get": frozenset({"read", "string"}), "set": frozenset({"write", "string"}),
            "flushall": frozenset({"write", "dangerous"}), "client|kill": frozenset({"admin", "dangerous"}),
            "client|id": frozenset({"connection"})}


def test_acl_rules_are_compared_by_effect():
    """Redundant rules and rule order that change nothing give the same allowed set; a real change does not."""
    redis_form = parse_acl_line("user u on #" + "ab" * 32 + " ~k:* resetchannels -@all +get")
    valkey_form = parse_acl_line("user u on sanitize-payload #" + "ab" * 32 + " ~k:* resetchannels -@all +get -flushall")
    assert allowed(redis_form.commands, UNIVERSE) == allowed(valkey_form.commands, UNIVERSE) == {"get"}
    assert redis_form.flags == valkey_form.flags and redis_form.hashes == valkey_form.hashes
    assert allowed(("+@all", "-@dangerous", "+client"), UNIVERSE) == {"get", "set", "client|kill", "client|id"}


def test_acl_mask_hides_hashes_and_passwords():
    """Rendered ACL rules never show a password hash or a >password."""
    line = "user a on #" + "0f" * 32 + " >plain ~*"
    assert mask(line) == "user a on #<hash> >*** ~*"


def test_verdict_and_remediation_rules():
    """Any fail makes the verdict fail, a warn or could-not-check makes it warn; a non-pass check needs a remediation."""
    ok = Check("a", "A", PASS, "fine")
    assert verdict([ok]) == "pass"
    assert verdict([ok, Check("b", "B", UNKNOWN, "?", "verify by hand")]) == "warn"
    assert verdict([ok, Check("c", "C", FAIL, "bad", "fix it")]) == "fail"
    with pytest.raises(ValueError):
        Check("d", "D", WARN, "hmm")


def test_data_format_status_fails_when_no_method_carries_a_type():
    """No method copying a type fails either direction; type-aware forward warns; unconfirmed is could-not-check."""
    from migrator.compat.canary import Transfer
    from migrator.compat.dataformat import Direction, _status

    def direction(*transfers, unavailable=""):
        return Direction("source", "target", list(transfers), unavailable)

    ok = direction(Transfer("hash", "dump-restore", True, 10))
    typed = direction(Transfer("hash", "dump-restore", False, 80, "bad payload"), Transfer("hash", "type-aware", True))
    broken = direction(Transfer("hash", "dump-restore", False, 80, "bad"), Transfer("hash", "type-aware", False, None, "x"))
    unknown = direction(unavailable="DUMP is not available")
    assert _status(ok, ok, ok.method, ok.method)[0] == PASS
    assert _status(typed, ok, typed.method, ok.method)[0] == WARN and typed.method == "type-aware"
    assert _status(broken, ok, broken.method, ok.method)[0] == FAIL and broken.method is None
    assert _status(ok, broken, ok.method, broken.method)[0] == FAIL
    assert _status(unknown, ok, "dump-restore", ok.method)[0] == UNKNOWN and unknown.method is None


def test_local_scratch_prefers_the_targets_version_then_the_closest():
    """scratch: local picks the binary matching the target's major.minor, else the closest one with a note saying so."""
    from migrator import servers
    from migrator.compat.scratch import pick_binary

    labels = {b.label for b in servers.discover()}
    if not {"valkey-8.1", "valkey-9.1"} <= labels:
        pytest.skip("needs the valkey-8.1 and valkey-9.1 binaries")
    exact, note = pick_binary(VALKEY_81)
    assert exact.label == "valkey-8.1" and note == ""
    closest, note = pick_binary(identify({"server_name": "valkey", "valkey_version": "9.0.3"}))
    assert closest.label == "valkey-9.1" and "no local valkey 9.0 binary" in note
