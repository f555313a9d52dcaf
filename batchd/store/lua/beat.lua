-- A replica's heartbeat, in one call: renew the lease on its name, record the beat in the heartbeat zset,
-- and take or renew the metrics-leader lease (the replica exporting the queue gauges).
-- KEYS[1] heartbeat zset, KEYS[2] the name's lease, KEYS[3] the metrics-leader lease.
-- ARGV[1] replica name, ARGV[2] this process's token, ARGV[3] now (ms), ARGV[4] name lease (ms),
-- ARGV[5] metrics lease (ms).
-- Returns {owner, leader}: owner 0 if another process holds the name (nothing is written: this one
-- stops), leader 1 if this replica holds the metrics lease now.
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[2] then
  return {0, 0}
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local leader = redis.call('GET', KEYS[3])
if leader and leader ~= ARGV[1] then
  return {1, 0}
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[5])
return {1, 1}
