import time

from migrator.workload import Workload


def test_ledger_audit_passes_on_the_server_written_and_catches_a_lost_write(server_factory):
    """Directly against one server every acknowledged write audits clean; a lost write is caught."""
    s = server_factory("redis-7.0")
    w = Workload(s.url, clients=3, rate=None, seed=7)
    with w:
        time.sleep(0.5)
    assert w.ops > 100 and not w.errors
    result = w.audit(s.client())
    assert result.ok, result.problems
    lst = next(k for led in w.ledgers for k in led.lists)
    s.client().rpop(lst)  # lose the last acknowledged push
    ctr = next(iter(w.ledgers[0].counters))
    s.client().decr(ctr)
    bad = w.audit(s.client())
    assert not bad.ok and len(bad.problems) == 2
