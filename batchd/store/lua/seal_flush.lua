-- Seal a flush: no more chunks. An empty flush is removed instead.
-- KEYS[1] flush hash, KEYS[2] flushes zset, KEYS[3] flush rids list. ARGV[1] fid, ARGV[2] trigger, ARGV[3] now.
-- Returns the number of requests in the sealed flush (0: removed, -1: no such flush or not building).
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'building' then
  return -1
end
local n = tonumber(redis.call('HGET', KEYS[1], 'requests'))
if n == 0 then
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'sealed', 'trigger', ARGV[2], 'sealed', ARGV[3])
return n
