"""The tests' private redis-server: the same class the demo uses (batchd.localredis), re-exported here so
tests import it from one obvious place::

    from tests.redis_server import RedisServer
"""

from batchd.localredis import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
