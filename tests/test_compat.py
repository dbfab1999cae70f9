"""The compatibility pre-flight against real Redis and Valkey servers (no mocks)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from migrator import compat, gates, playbook, reports
from migrator.compat.canary import CANARY_PREFIX, Canaries
from migrator.compat.model import FAIL, PASS, UNKNOWN, WARN
from migrator.compat.rpc import Side
from migrator.state import StateStore
from tests.helpers import run_cli

# A tiny application test: uses REDIS_URL the way a real suite would.
APP_TEST = (
    "import os, redis\n"
    "r = redis.Redis.from_url(os.environ['REDIS_URL'])\n"
    "r.set('app:probe', 'v'); assert r.get('app:probe') == b'v'\n"
    "assert os.environ['VALKEY_URL'] == os.environ['REDIS_URL']\n"
    "print('app test ok, dbsize', r.dbsize())\n"
)


def fill(client, prefix: str = "") -> None:
    """One key of each core type, as an application would have."""
    client.set(f"{prefix}s", "v", ex=3600)
    client.hset(f"{prefix}h", mapping={"a": "1", "b": "2"})
    client.rpush(f"{prefix}l", "x", "y")
    client.sadd(f"{prefix}set", "m")
    client.zadd(f"{prefix}z", {"m": 1.5})
    client.xadd(f"{prefix}x", {"f": "v"})


def run(make_playbook, source, target, *, write_report=True, **compatibility):
    path = make_playbook(source, target, steps={"compatibility": compatibility} if compatibility else {})
    pb = playbook.load(path)
    return pb, compat.run(pb, write_report=write_report)


def canaries_left(*servers) -> list:
    return [k for s in servers for k in s.client().keys(CANARY_PREFIX + "*")]


def restricted(server_factory, tmp_path: Path, label: str, *commands: str, **kw):
    """A server with commands disabled the way managed services do (``rename-command X ""``)."""
    conf = tmp_path / f"restricted-{label}.conf"
    conf.write_text("".join(f'rename-command {c} ""\n' for c in commands))
    return server_factory(label, config={"include": str(conf)}, **kw)


def test_compatible_pair_passes_with_report_and_local_scratch(server_factory, make_playbook, tmp_path):
    """Redis 7.0 → Valkey 9.1 passes every check, runs the app test on a local scratch Valkey, writes all report files."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    fill(source.client())
    script = tmp_path / "app_test.py"
    script.write_text(APP_TEST)
    pb, result = run(make_playbook, source, target, test_command=[sys.executable, str(script)], scratch="local")

    assert result.verdict == "pass", [(c.name, c.status, c.evidence) for c in result.checks if c.status != PASS]
    tests = result.check("tests")
    assert "valkey 9.1" in tests.evidence and tests.data["run"]["exit_code"] == 0
    assert "app test ok, dbsize 1" in tests.data["run"]["tail"]
    assert result.data["copy_method"] == "dump-restore" and result.data["rollback_copy_method"] == "type-aware"
    assert result.data["rdb_versions"] == {"source": 10, "target": 80}
    # Nothing of the test or the canaries is left on either server; the user's data is untouched.
    assert canaries_left(source, target) == [] and target.client().dbsize() == 0
    assert source.client().dbsize() == 6
    ref = reports.latest(pb.state_path, "compat")
    assert ref["id"] == result.report_id and ref["copy_method"] == "dump-restore"
    folder = reports.reports_dir(pb.state_path)
    page = (folder / f"{result.report_id}.html").read_text()
    assert "<style>" in page and "src=" not in page and "verdict pass" in page
    assert (folder / f"{result.report_id}.md").read_text().startswith(f"# Compatibility report {result.report_id}")


def test_valkey91_to_valkey81_flags_payload_commands_and_field_ttls(server_factory, make_playbook):
    """Valkey 9.1 → 8.1: RDB 80 vs 11 forces a type-aware sync; 9.x-only commands and hash field TTLs fail."""
    source, target = server_factory("valkey-9.1"), server_factory("valkey-8.1")
    c = source.client()
    fill(c)
    c.execute_command("HEXPIRE", "h", 600, "FIELDS", 1, "a")
    c.execute_command("DELIFEQ", "nokey", "v")
    _pb, result = run(make_playbook, source, target)

    fmt = result.check("data.format")
    assert fmt.status == WARN and fmt.data["rdb_versions"] == {"source": 80, "target": 11}
    assert fmt.data["copy_method"] == "type-aware" and fmt.data["rollback_copy_method"] == "dump-restore"
    assert fmt.data["replication"]["target_replicates_source"].startswith("does not work")
    missing = result.check("commands.missing")
    assert missing.status == FAIL and {"hexpire", "delifeq"} <= set(missing.data["missing"])
    assert "since 9.0.0" in missing.evidence
    types = result.check("data.types")
    assert types.status == FAIL and "field TTLs" in types.evidence
    assert result.check("identity").status == WARN
    # Valkey 9 lists its Lua engine as a module: it is not something to migrate.
    assert result.check("modules").status == PASS
    assert result.verdict == "fail" and canaries_left(source, target) == []


def test_relaxed_rdb_version_check_lets_dump_restore_through(server_factory, make_playbook):
    """With rdb-version-check relaxed, Valkey 8.1 RESTOREs Valkey 9.1 payloads, and the canary proves it."""
    source = server_factory("valkey-9.1")
    target = server_factory("valkey-8.1", config={"rdb-version-check": "relaxed"})
    fill(source.client())
    _pb, result = run(make_playbook, source, target, write_report=False)
    fmt = result.check("data.format")
    assert fmt.data["copy_method"] == "dump-restore" and "relaxed" in fmt.evidence
    assert result.report_id is None


def test_redis70_source_on_redis62_target_lacks_lmpop_and_zintercard(server_factory, make_playbook):
    """Commands a Redis 7.0 source executed (LMPOP, ZINTERCARD) that Redis 6.2 lacks fail, and RDB 10 cannot RESTORE into 6.2."""
    source, target = server_factory("redis-7.0"), server_factory("redis-6.2")
    c = source.client()
    c.rpush("l", "a", "b")
    c.execute_command("LMPOP", 1, "l", "LEFT")
    c.zadd("z1", {"a": 1})
    c.execute_command("ZINTERCARD", 1, "z1")
    _pb, result = run(make_playbook, source, target)
    missing = result.check("commands.missing")
    assert missing.status == FAIL and {"lmpop", "zintercard"} <= set(missing.data["missing"])
    assert "rpush" not in missing.data["missing"]
    fmt = result.check("data.format")
    assert fmt.data["copy_method"] == "type-aware" and fmt.data["rdb_versions"]["target"] == 9
    assert result.check("identity").status == WARN  # the target is not Valkey


def test_acl_users_compared_by_effect_without_showing_secrets(server_factory, make_playbook):
    """A user missing on the target and one with other rules fail; the same rules written differently pass; no hash is shown."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-8.1")
    s, t = source.client(), target.client()
    # Redis drops the redundant -flushall from ACL LIST, Valkey keeps it: same effect.
    for c in (s, t):
        c.execute_command("ACL", "SETUSER", "carol", "on", ">carol-pass", "~c:*", "-@all", "+get", "-flushall")
    s.execute_command("ACL", "SETUSER", "alice", "on", ">alice-pass", "~app:*", "+@read")
    s.execute_command("ACL", "SETUSER", "bob", "on", ">bob-pass", "~b:*", "+get", "+set")
    t.execute_command("ACL", "SETUSER", "bob", "on", ">bob-pass", "~b:*", "+get")
    pb, result = run(make_playbook, source, target)
    acl = result.check("acl")
    assert acl.status == FAIL
    assert acl.data["missing"] == ["alice"] and list(acl.data["differ"]) == ["bob"]
    assert "set" in acl.data["differ"]["bob"][0]
    report = reports.reports_dir(pb.state_path)
    written = "".join(p.read_text() for p in report.iterdir())
    for pw in ("alice-pass", "bob-pass", "carol-pass"):
        assert hashlib.sha256(pw.encode()).hexdigest() not in written + acl.evidence + acl.remediation
        assert pw not in written


def test_requirepass_compared_by_presence_only(server_factory, make_playbook):
    """A source that requires a password and a target that does not fails the auth check, and the password appears nowhere."""
    source = server_factory("redis-7.0", password="src-secret-123")
    target = server_factory("valkey-9.1")
    pb, result = run(make_playbook, source, target)
    auth = result.check("auth")
    assert auth.status == FAIL and auth.data == {"source_requirepass": True, "target_requirepass": False}
    written = "".join(p.read_text() for p in reports.reports_dir(pb.state_path).iterdir())
    assert "src-secret-123" not in written and "src-secret-123" not in json.dumps(result.to_json(), default=str)
    assert result.check("acl").status == FAIL  # the default user's password differs too


def test_non_empty_target_fails_unless_allowed_and_canaries_do_not_count(server_factory, make_playbook):
    """A target holding a user key fails the keyspace check unless allow_non_empty_target; migrator's own keys never count."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    target.client().set("__migrator:canary:stale:x", "1")
    _pb, clean = run(make_playbook, source, target, write_report=False)
    assert clean.check("keyspace").status == PASS
    target.client(db=2).set("someone:else", "1")
    _pb, dirty = run(make_playbook, source, target, write_report=False)
    assert dirty.check("keyspace").status == FAIL and "db2: 1" in dirty.check("keyspace").evidence
    _pb, allowed = run(make_playbook, source, target, write_report=False, allow_non_empty_target=True)
    assert allowed.check("keyspace").status == WARN


def test_renamed_config_module_debug_degrade_to_could_not_check(server_factory, make_playbook, tmp_path):
    """With CONFIG, MODULE and DEBUG renamed away (a managed service), those checks say could-not-check and nothing crashes."""
    source = restricted(server_factory, tmp_path, "redis-7.0", "CONFIG", "MODULE", "DEBUG")
    target = server_factory("valkey-9.1")
    fill(source.client())
    _pb, result = run(make_playbook, source, target)
    config, modules = result.check("config"), result.check("modules")
    assert config.status == UNKNOWN and "CONFIG" in config.evidence and config.remediation
    assert modules.status == UNKNOWN and "MODULE LIST" in modules.evidence
    assert result.check("auth").status == PASS  # fell back to the default user's ACL
    assert result.check("data.format").status == PASS
    assert result.verdict == "warn"


def test_config_differences_get_severities(server_factory, make_playbook):
    """Too little maxmemory, an evicting policy, too few databases and missing keyspace events fail; a longer timeout warns."""
    source = server_factory("redis-7.0", config={"notify-keyspace-events": "KEA", "timeout": "300"})
    target = server_factory("valkey-8.1", config={"maxmemory": "500000", "maxmemory-policy": "allkeys-lru",
                                                  "databases": "2"})
    source.client(db=3).set("k", "v")
    _pb, result = run(make_playbook, source, target)
    config = result.check("config")
    status = {s["setting"]: s["status"] for s in config.data["settings"]}
    assert config.status == FAIL
    assert status["maxmemory"] == FAIL and status["maxmemory-policy"] == FAIL and status["databases"] == FAIL
    assert status["notify-keyspace-events"] == FAIL and status["timeout"] == WARN
    assert status["save"] == PASS and status["repl-backlog-size"] == PASS  # a larger backlog on the target is fine
    assert "CONFIG SET maxmemory-policy noeviction" in config.remediation


def test_functions_missing_and_scripts_warned(server_factory, make_playbook):
    """A function library absent on the target fails; EVAL use on the source warns that scripts cannot be listed."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    c = source.client()
    c.execute_command("FUNCTION", "LOAD", "#!lua name=mylib\nredis.register_function('echo1', function(k, a) return a[1] end)")
    c.eval("return 1", 0)
    _pb, result = run(make_playbook, source, target)
    functions, scripts = result.check("functions"), result.check("scripts")
    assert functions.status == FAIL and functions.data["missing"] == ["mylib"]
    assert functions.data["source"] == {"mylib": ["echo1"]}
    assert scripts.status == WARN and scripts.data["calls"]["eval"] == 1
    assert result.check("commands.behaviour").status == WARN and "eval" in result.check("commands.behaviour").data["differences"]


def test_docker_scratch_without_engine_gives_one_clear_error(server_factory, make_playbook, monkeypatch):
    """scratch: docker with no reachable Docker engine fails the tests check with a message that says so."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    source, target = server_factory("redis-7.0"), server_factory("valkey-8.1")
    _pb, result = run(make_playbook, source, target, write_report=False, test_command="true", scratch="docker")
    tests = result.check("tests")
    assert tests.status == FAIL and "no Docker engine is reachable" in tests.evidence
    assert "\n" not in tests.evidence


def test_scratch_unset_uses_the_empty_target_and_flushes_it(server_factory, make_playbook):
    """Without a scratch mode the tests run on the empty target, which is flushed afterwards; a non-empty target is refused."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    fill(source.client())
    _pb, result = run(make_playbook, source, target, write_report=False, scratch_seed=3,
                      test_command="python -c \"import os,redis; r=redis.Redis.from_url(os.environ['REDIS_URL']); "
                                   "n=r.dbsize(); print('keys', n); raise SystemExit(0 if n == 3 else 1)\"")
    tests = result.check("tests")
    assert tests.status == PASS, tests.evidence
    assert tests.data["seed"]["copied"] == 3 and "keys 3" in tests.data["run"]["tail"]
    assert target.client().dbsize() == 0
    target.client().set("user:1", "x")
    _pb, refused = run(make_playbook, source, target, write_report=False, test_command="true",
                       scratch="target", allow_non_empty_target=True)
    assert refused.check("tests").status == FAIL and "refused" in refused.check("tests").evidence
    assert target.client().get("user:1") == b"x"


def test_failing_and_hanging_test_commands_fail_with_tail(server_factory, make_playbook):
    """A test command that exits non-zero fails with its output tail; one past test_timeout is killed and fails."""
    source, target = server_factory("redis-6.2"), server_factory("valkey-8.1")
    _pb, failed = run(make_playbook, source, target, write_report=False, scratch="local",
                      test_command="echo first; echo 'boom: 1 test failed' >&2; exit 3")
    tests = failed.check("tests")
    assert tests.status == FAIL and tests.data["run"]["exit_code"] == 3
    assert tests.data["run"]["tail"] == "first\nboom: 1 test failed" and "boom" in tests.evidence
    _pb, hung = run(make_playbook, source, target, write_report=False, scratch="local",
                    test_command=["sleep", "30"], test_timeout="1s")
    run_data = hung.check("tests").data["run"]
    assert run_data["timed_out"] and run_data["exit_code"] is None and run_data["duration_s"] < 10


def test_no_test_command_warns(server_factory, make_playbook):
    """Without steps.compatibility.test_command the run warns that no application test ran."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    _pb, result = run(make_playbook, source, target, write_report=False)
    assert result.check("tests").status == WARN and result.verdict == "warn"


def test_canaries_are_removed_even_when_the_run_fails(server_factory, make_playbook):
    """Canary keys made on both servers are deleted when the block exits with an error."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = playbook.load(make_playbook(source, target))
    src, dst = Side.open("source", pb.source), Side.open("target", pb.target)
    with pytest.raises(RuntimeError):
        with Canaries(src, dst) as can:
            key = can.make("source", "hash")
            can.dump_restore("source", "target", "hash", key)
            assert len(canaries_left(source, target)) == 2
            raise RuntimeError("simulated failure mid-check")
    assert canaries_left(source, target) == []


def test_gate_reports_newest_result_read_only_and_runs_otherwise(server_factory, make_playbook):
    """plan (read-only) reports the newest report's verdict and age without running; advance runs the pre-flight."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = playbook.load(make_playbook(source, target))
    store = StateStore(pb.state_path, pb.name)
    ro = gates.make_context(pb, store, store.load(), read_only=True)
    [first] = gates.evaluate(("compatibility",), ro)
    assert not first.passed and "no compatibility run yet" in first.evidence
    [ran] = gates.evaluate(("compatibility",), gates.make_context(pb, store, store.load()))
    assert ran.passed and ran.evidence.startswith(f"compatibility report {ran.data['report_id']}: ")
    assert " warn, 0 fail" in ran.evidence
    [again] = gates.evaluate(("compatibility",), ro)
    assert again.passed and again.data["report_id"] == ran.data["report_id"] and "ago" in again.evidence
    assert len(reports.list_reports(pb.state_path, "compat")) == 1  # read-only ran nothing


def test_cli_exit_codes_and_json(server_factory, make_playbook):
    """migrator compat exits 1 with JSON on a failing pair and 3 with one FAILED line when a server is down."""
    source, target = server_factory("redis-7.0"), server_factory("redis-6.2")
    source.client().execute_command("LMPOP", 1, "nolist", "LEFT")
    path = make_playbook(source, target)
    out = run_cli("compat", "--output", "json", playbook=path)
    assert out.returncode == 1, out.stderr
    data = json.loads(out.stdout)
    assert data["verdict"] == "fail" and data["copy_method"] == "type-aware"
    text = run_cli("compat", "--no-report", playbook=path)
    assert text.returncode == 1 and "FAIL" in text.stdout and "Commands the target lacks" in text.stdout
    target.stop()
    down = run_cli("compat", playbook=path)
    assert down.returncode == 3 and down.stderr.strip().count("\n") == 0
    assert down.stderr.startswith("FAILED: target redis://127.0.0.1:")


def test_replica_source_is_predicted_and_replica_target_fails(server_factory, make_playbook):
    """A read-only replica source cannot take canaries, so the copy method is predicted; a replica target fails topology."""
    primary, source, target = server_factory("redis-7.0"), server_factory("redis-7.0"), server_factory("valkey-9.1")
    primary.client().set("k", "v")
    source.client().replicaof("127.0.0.1", primary.port)
    _pb, result = run(make_playbook, source, target, write_report=False)
    fmt = result.check("data.format")
    assert fmt.status == UNKNOWN and "predicted dump-restore" in fmt.evidence and "read-only replica" in fmt.evidence
    assert fmt.data["copy_method"] == "dump-restore"  # RDB 10 into Valkey 9.1, from the table
    target.client().replicaof("127.0.0.1", primary.port)
    _pb, result = run(make_playbook, primary, target, write_report=False)
    assert result.check("topology").status == FAIL and "replica" in result.check("topology").evidence


def test_user_without_admin_commands_gets_could_not_check(server_factory, make_playbook):
    """A source user denied @admin (NOPERM on CONFIG, ACL, MODULE) gets could-not-check for those checks, not a crash."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    source.client().execute_command("ACL", "SETUSER", "app", "on", ">app-pass-1", "~*", "&*", "+@all", "-@admin")
    fill(source.client())
    url = f"redis://app:app-pass-1@127.0.0.1:{source.port}/0"
    _pb, result = run(make_playbook, url, target, write_report=False)
    for name in ("config", "acl", "modules"):
        check = result.check(name)
        assert check.status == UNKNOWN and "no permissions" in check.evidence, (name, check.evidence)
    assert result.check("data.format").status == PASS and result.check("commands.missing").status == PASS


def test_target_password_reaches_the_tests_but_never_the_report(server_factory, make_playbook):
    """The test command gets a REDIS_URL that authenticates to a password-protected target; its echoed URL is redacted."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1", password="tgt-secret-456")
    ping = "import os, redis; print('ping', redis.Redis.from_url(os.environ['REDIS_URL']).ping())"
    pb, result = run(make_playbook, source, target, test_command=f'echo "url=$REDIS_URL"; python -c "{ping}"')
    tests = result.check("tests")
    assert tests.status == PASS and "ping True" in tests.data["run"]["tail"]
    assert "tgt-secret-456" not in json.dumps(result.to_json(), default=str)
    assert result.check("auth").status == WARN  # clients will need the password after the cutover
    written = "".join(p.read_text() for p in reports.reports_dir(pb.state_path).iterdir())
    assert "url=redis://:***@127.0.0.1" in written and "tgt-secret-456" not in written


def test_reset_command_statistics_warn_and_field_ttls_pass_on_valkey9(server_factory, make_playbook):
    """After CONFIG RESETSTAT the command check warns it has nothing to compare; Valkey 9 → 9 keeps hash field TTLs."""
    source, target = server_factory("valkey-9.1"), server_factory("valkey-9.1")
    c = source.client()
    c.hset("h", mapping={"a": "1"})
    c.execute_command("HEXPIRE", "h", 600, "FIELDS", 1, "a")
    c.config_resetstat()
    _pb, result = run(make_playbook, source, target, write_report=False)
    assert result.check("commands.missing").status == WARN
    types = result.check("data.types")
    assert types.status == PASS and "1 hash(es) use field TTLs" in types.evidence


def test_a_key_deleted_between_scan_and_type_is_not_a_type_the_target_cannot_hold(server_factory, make_playbook, monkeypatch):
    """On a live source a sampled key can vanish before its TYPE is read ("none"): it is dropped from
    the sample, not reported as module data the target cannot hold (a flaky failure under load)."""
    import redis as redis_mod

    from migrator.compat import sample as sample_mod

    source = server_factory("redis-7.0")
    c = source.client()
    c.mset({f"k{i}": "v" for i in range(20)})
    real_execute = redis_mod.client.Pipeline.execute

    def delete_first(self, *a, **kw):
        if any(args[0] == "TYPE" for args, _ in self.command_stack):
            c.delete("k3", "k7")  # another client deletes two keys just before the TYPEs run
        return real_execute(self, *a, **kw)

    monkeypatch.setattr(redis_mod.client.Pipeline, "execute", delete_first)
    pb = playbook.load(make_playbook(source, server_factory("valkey-9.1")))
    result = sample_mod.sample(Side.open("source", pb.source))
    assert dict(result.types()) == {"string": 18}
    assert sum(len(d.sampled) for d in result.dbs.values()) == 18
