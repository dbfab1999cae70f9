"""Server configurations that emulate managed services' documented restrictions.

Each profile is a list of config lines for ``server_factory(label, conf_lines=...)``: the
``rename-command X ""`` lines remove a command the way a provider blocks it (the server then
answers ``ERR unknown command``, the answer the providers document or give), and ``user``
lines restrict the default user by ACL where the provider enforces its restrictions as ACL
rules (``NOPERM``). Only what each provider's page lists is emulated; a provider may block
more than its page says.
"""

from __future__ import annotations

# Commands only a provider's operators may run; every profile blocks them (none is used by migrator).
_ADMIN = ("BGREWRITEAOF", "BGSAVE", "SAVE", "SHUTDOWN", "MIGRATE")


def _renamed(*commands: str) -> list[str]:
    return [f'rename-command {c} ""' for c in (*_ADMIN, *commands)]


PROFILES: dict[str, dict] = {
    # https://docs.aws.amazon.com/AmazonElastiCache/latest/dg/ClientConfig.RestrictedCommands.html
    # (bgrewriteaof, bgsave, config, debug, migrate, replicaof, save, slaveof, shutdown, sync)
    "elasticache": {
        "conf": _renamed("CONFIG", "DEBUG", "REPLICAOF", "SLAVEOF", "SYNC"),
        "refused": {"CONFIG GET", "CONFIG SET", "DEBUG", "REPLICAOF", "SYNC"},
        "provider": "AWS ElastiCache",
    },
    # https://docs.aws.amazon.com/memorydb/latest/devguide/restrictedcommands.html (acl setuser/
    # deluser/load/save, bgrewriteaof, bgsave, cluster addslot/delslot/setslot, config, debug,
    # migrate, module, psync, replicaof, save, shutdown, slaveof, sync). MemoryDB enforces access
    # with ACLs: here the default user is denied them by ACL rules (NOPERM), not by renaming.
    "memorydb": {
        "conf": [("user default on nopass ~* &* +@all -config -debug -migrate -module -psync -sync -replicaof "
                  "-slaveof -bgsave -bgrewriteaof -save -shutdown -acl|setuser -acl|deluser -acl|load -acl|save "
                  "-cluster|addslots -cluster|delslots -cluster|setslot")],
        # (DEBUG answers "not allowed" (enable-debug-command) before any ACL check: disabled, not denied.)
        "refused": {"CONFIG GET", "CONFIG SET", "REPLICAOF", "SYNC", "PSYNC"},
        "provider": "AWS MemoryDB",
    },
    # https://cloud.google.com/memorystore/docs/redis/product-constraints#blocked_redis_commands
    # (ACL subcommands, BGREWRITEAOF, BGSAVE, CLIENT, CLUSTER, COMMAND, CONFIG, DEBUG, LASTSAVE,
    # MIGRATE, MONITOR, OBJECT, SHUTDOWN, REPLICAOF, SAVE); SYNC and PSYNC are not on the page of
    # supported commands (https://cloud.google.com/memorystore/docs/redis/supported-commands).
    "memorystore": {
        "conf": _renamed("ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "LASTSAVE", "MONITOR", "OBJECT",
                         "REPLICAOF", "SLAVEOF", "SYNC", "PSYNC"),
        "refused": {"CONFIG GET", "COMMAND", "OBJECT ENCODING", "CLIENT ID", "MONITOR", "CLUSTER", "REPLICAOF", "SYNC",
                    "PSYNC"},
        "provider": "Google Memorystore for Redis",
    },
    # https://learn.microsoft.com/en-us/azure/azure-cache-for-redis/cache-configure
    # #redis-commands-not-supported-in-azure-cache-for-redis (BGREWRITEAOF, BGSAVE, CONFIG, DEBUG,
    # MIGRATE, SAVE, SHUTDOWN, SLAVEOF, REPLICAOF; "(error) ERR unknown command").
    "azure": {
        "conf": _renamed("CONFIG", "DEBUG", "REPLICAOF", "SLAVEOF"),
        "refused": {"CONFIG GET", "CONFIG SET", "DEBUG", "REPLICAOF"},
        "provider": "Azure Cache for Redis",
    },
}
