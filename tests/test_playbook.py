import re
from pathlib import Path

import pytest

from migrator import playbook
from migrator.errors import PlaybookError
from migrator.redact import redact

EXAMPLE = Path(__file__).resolve().parent.parent / "playbooks" / "example.yaml"


def load_text(tmp_path, text, env=None):
    p = tmp_path / "pb.yaml"
    p.write_text(text)
    return playbook.load(p, env=env or {})


def problems(tmp_path, text, env=None) -> list[str]:
    with pytest.raises(PlaybookError) as e:
        load_text(tmp_path, text, env)
    return e.value.problems


def test_example_playbook_is_valid_and_has_the_checklist_defaults():
    """The shipped example loads, and unset durations take the checklist's defaults."""
    pb = playbook.load(EXAMPLE, env={})
    assert pb.name == "sessions-cache"
    assert pb.steps.mirror.min_duration.total_seconds() == 7 * 86400
    assert pb.steps.read_cutover.min_duration.total_seconds() == 48 * 3600
    assert pb.steps.write_cutover.rollback_window.total_seconds() == 72 * 3600
    assert pb.state_dir == EXAMPLE.parent / ".migrator" / "sessions-cache"


def test_every_error_is_reported_with_file_line_and_column(tmp_path):
    """All problems are listed, each as PATH:LINE:COL: field: message, pointing at the offending text."""
    text = (
        "version: 1\n"
        "name: ok\n"
        "source: {url: 'http://h:1/0'}\n"
        "target:\n"
        "  url: redis://h:2/0\n"
        "  colour: blue\n"
        "steps:\n"
        "  mirror: {min_duration: soon}\n"
    )
    out = problems(tmp_path, text)
    path = str(tmp_path / "pb.yaml")
    assert all(line.startswith(path + ":") for line in out)
    assert f"{path}:3:15: source.url: URL scheme must be redis:// or rediss://, not http://" in out
    assert f"{path}:6:3: target.colour: unknown field" in out
    assert any(re.match(re.escape(path) + r":8:26: steps\.mirror\.min_duration: not a duration", p) for p in out)
    assert len(out) == 3


def test_missing_required_field_points_at_its_parent(tmp_path):
    """A missing field is reported where it should have been (its parent mapping)."""
    out = problems(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://a:1'}\ntarget:\n  username: bob\n")
    assert any(p.endswith(":4:1: target: give url (a server or any cluster node) or sentinel "
                          "(a Sentinel-managed primary)") for p in out), out
    out = problems(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://a:1'}\ntarget:\n"
                             "  sentinel:\n    addresses: ['h:26379']\n")
    assert any(p.endswith(":5:3: target.sentinel.master_name: Field required") for p in out), out


def test_yaml_syntax_error_has_position(tmp_path):
    """Broken YAML is one line with the position of the problem."""
    out = problems(tmp_path, "version: 1\nname: [unclosed\n")
    assert len(out) == 1 and re.search(r"pb\.yaml:\d+:\d+: yaml: ", out[0])


def test_missing_file_is_a_clear_error(tmp_path):
    """A playbook that does not exist is named, with how to point at another one."""
    with pytest.raises(PlaybookError) as e:
        playbook.load(tmp_path / "nope.yaml")
    assert "nope.yaml: playbook not found" in str(e.value)
    assert e.value.exit_code == 2


def test_env_interpolation_and_defaults(tmp_path):
    """${VAR} is replaced from the environment, ${VAR:-default} falls back, and an unset one is an error with its position."""
    base = "version: 1\nname: x\nsource: {url: 'redis://${SRC_HOST}:1'}\ntarget: {url: 'redis://${TGT_HOST:-127.0.0.9}:2'}\n"
    pb = load_text(tmp_path, base, env={"SRC_HOST": "10.0.0.1"})
    assert pb.source.host == "10.0.0.1" and pb.target.host == "127.0.0.9"
    out = problems(tmp_path, base, env={})
    assert len(out) == 1, out
    assert any(p.endswith(":3:15: source.url: environment variable SRC_HOST is not set") for p in out), out


def test_password_env_is_resolved_and_never_shown(tmp_path):
    """password_env supplies the password; display strings and redaction hide it and URL passwords alike."""
    text = (
        "version: 1\nname: x\n"
        "source: {url: 'redis://alice:s3cr3t-in-url@h:1/2'}\n"
        "target: {url: 'redis://h:2', password_env: TGT_PW}\n"
    )
    pb = load_text(tmp_path, text, env={"TGT_PW": "hunter2-from-env"})
    assert pb.source.password == "s3cr3t-in-url" and pb.source.user == "alice" and pb.source.db == 2
    assert pb.target.password == "hunter2-from-env"
    assert "s3cr3t" not in pb.source.display and "***" in pb.source.display
    assert redact("auth with hunter2-from-env failed") == "auth with *** failed"
    out = problems(tmp_path, text, env={})
    assert any(p.endswith(":4:44: target.password_env: environment variable TGT_PW is not set") for p in out), out


def test_relative_state_dir_is_relative_to_the_playbook(tmp_path):
    """state_dir is resolved against the playbook's folder, not the working directory."""
    pb = load_text(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://a:1'}\ntarget: {url: 'redis://a:2'}\nstate_dir: st/x\n")
    assert pb.state_dir == tmp_path / "st" / "x"


def test_same_server_and_exposed_shim_are_refused(tmp_path):
    """Source and target may not be one server, and a shim beyond loopback needs a password."""
    out = problems(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://a:1'}\ntarget: {url: 'redis://a:1/0'}\n")
    assert any("source and target are the same server" in p for p in out)
    out = problems(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://a:1'}\ntarget: {url: 'redis://a:2'}\nshim: {listen: '0.0.0.0:6380'}\n")
    assert any("shim.password" in p for p in out)


def test_shim_auth_modes_are_checked_against_the_password(tmp_path):
    """shim.auth defaults from the password, contradictions with it are errors naming both fields, and a
    passthrough shim may listen beyond loopback (the servers check every login)."""
    head = "version: 1\nname: x\nsource: {url: 'redis://a:1'}\ntarget: {url: 'redis://a:2'}\n"
    assert load_text(tmp_path, head).shim.auth_mode == "none"
    assert load_text(tmp_path, head + "shim: {password: pw-123}\n").shim.auth_mode == "password"
    pb = load_text(tmp_path, head + "shim: {auth: passthrough, listen: '0.0.0.0:6380'}\n")
    assert pb.shim.auth_mode == "passthrough"
    out = problems(tmp_path, head + "shim: {auth: password}\n")
    assert any("shim.auth is password but neither shim.password nor shim.password_env is set" in p for p in out), out
    out = problems(tmp_path, head + "shim: {auth: passthrough, password: pw-123}\n")
    assert any("shim.auth is passthrough but shim.password" in p for p in out), out
    out = problems(tmp_path, head + "shim: {auth: none, listen: '0.0.0.0:6380'}\n")
    assert any("is required when shim.listen is not a loopback address" in p for p in out), out
    out = problems(tmp_path, head + "shim: {auth: users}\n")
    assert any("shim.auth" in p for p in out), out


def test_tls_requires_rediss(tmp_path):
    """TLS options on a plain redis:// URL are a mistake worth naming."""
    out = problems(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://a:1', tls: {verify: false}}\ntarget: {url: 'rediss://a:2'}\n")
    assert any("source: tls options given but the URL is not rediss://" in p for p in out), out


def test_endpoints_hash_ignores_passwords_but_not_servers(tmp_path):
    """Rotating a password keeps the migration's identity; pointing at another server changes it."""
    a = load_text(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://:pw1@a:1'}\ntarget: {url: 'redis://a:2'}\n")
    b = load_text(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://:pw2@a:1'}\ntarget: {url: 'redis://a:2'}\n")
    c = load_text(tmp_path, "version: 1\nname: x\nsource: {url: 'redis://a:1'}\ntarget: {url: 'redis://a:3'}\n")
    assert a.endpoints_hash() == b.endpoints_hash() != c.endpoints_hash()
