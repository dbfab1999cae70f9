"""The shim as a one-node Redis Cluster: what it answers to ``CLUSTER`` (pure, no IO).

When a side of the migration is a cluster, cluster-aware clients (redis-py ``RedisCluster``,
Lettuce, go-redis, Jedis) connect to the shim as if it were the cluster. The shim presents
one node, at the address the client reached it on, owning all 16384 slots: such a client then
sends everything to the shim, which routes each command by slot on each side itself
(``shim.clusterside``). ``CLUSTER SLOTS``, ``SHARDS``, ``NODES``, ``MYID``, ``MYSHARDID``,
``INFO``, ``LINKS`` and ``KEYSLOT`` are answered here; ``COUNTKEYSINSLOT`` and
``GETKEYSINSLOT`` go to the side that answers reads (to the slot's owner there); any other
subcommand (they change or inspect the real cluster) is refused.
"""

from __future__ import annotations

import hashlib

from migrator.cluster import SLOTS, key_slot
from migrator.shim.resp import error_reply

FORWARDED = frozenset({b"countkeysinslot", b"getkeysinslot"})


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _arr(items: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


class Facade:
    def __init__(self, name: str, address: tuple[str, int]) -> None:
        self.node_id = hashlib.sha1(f"migrator-shim:{name}".encode()).hexdigest().encode()
        self.shard_id = hashlib.sha1(f"migrator-shard:{name}".encode()).hexdigest().encode()
        self.address = address

    def answer(self, args: list[bytes], addr: tuple[str, int] | None = None) -> bytes | None:
        """The reply to a CLUSTER command; None when it goes to a side (COUNTKEYSINSLOT...)."""
        host, port = addr or self.address
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        h = host.encode()
        if len(args) < 2:
            return error_reply("ERR wrong number of arguments for 'cluster' command")
        sub = args[1].lower()
        if sub in FORWARDED:
            return None
        if sub == b"slots":
            return _arr([_arr([b":0\r\n", b":%d\r\n" % (SLOTS - 1), _arr([_bulk(h), b":%d\r\n" % port, _bulk(self.node_id)])])])
        if sub == b"shards":
            node = _arr([_bulk(b"id"), _bulk(self.node_id), _bulk(b"port"), b":%d\r\n" % port, _bulk(b"ip"), _bulk(h),
                         _bulk(b"endpoint"), _bulk(h), _bulk(b"role"), _bulk(b"master"),
                         _bulk(b"replication-offset"), b":0\r\n", _bulk(b"health"), _bulk(b"online")])
            return _arr([_arr([_bulk(b"slots"), _arr([b":0\r\n", b":%d\r\n" % (SLOTS - 1)]),
                               _bulk(b"nodes"), _arr([node])])])
        if sub == b"nodes":
            return _bulk(b"%s %s:%d@0 myself,master - 0 0 1 connected 0-%d\n" % (self.node_id, h, port, SLOTS - 1))
        if sub == b"myid":
            return _bulk(self.node_id)
        if sub == b"myshardid":
            return _bulk(self.shard_id)
        if sub == b"links":
            return b"*0\r\n"
        if sub == b"info":
            text = ("cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n"
                    "cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:1\r\ncluster_size:1\r\n"
                    "cluster_current_epoch:1\r\ncluster_my_epoch:1\r\ncluster_stats_messages_sent:0\r\n"
                    "cluster_stats_messages_received:0\r\ntotal_cluster_links_buffer_limit_exceeded:0\r\n")
            return _bulk(text.encode())
        if sub == b"keyslot":
            if len(args) != 3:
                return error_reply("ERR wrong number of arguments for 'cluster|keyslot' command")
            return b":%d\r\n" % key_slot(args[2])
        return error_reply(f"ERR migrator shim: CLUSTER {sub.decode(errors='replace').upper()} is not supported through "
                           "the shim, which presents the migration as a one-node cluster; connect to a node directly")
