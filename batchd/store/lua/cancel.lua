-- Cancel one request. KEYS[1] request hash, KEYS[2] result key, KEYS[3] queue stats.
-- ARGV[1] canceled results line (JSON), ARGV[2] result TTL (s), ARGV[3] pub/sub channel, ARGV[4] rid.
-- Returns 1 if it was still queued (removed: it will never reach the API), 2 if it was already flushed
-- (answered canceled now; the API may still process it, and that late answer is dropped), 0 if it already
-- had its answer, -1 if there is no such request.
local f = redis.call('HMGET', KEYS[1], 'state', 'bytes')
local state = f[1]
if not state then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
  end
  return -1
end
if state == 'done' then
  return 0
end
local ttl = tonumber(ARGV[2])
local code = 2
if state == 'queued' then
  code = 1
  -- Its stream entry stays; commit_flush acknowledges it without moving it.
  redis.call('HINCRBY', KEYS[3], 'requests', -1)
  redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(f[2]))
  redis.call('HDEL', KEYS[1], 'body')
end
redis.call('HSET', KEYS[1], 'state', 'done', 'cancel', 1)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ttl)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return code
