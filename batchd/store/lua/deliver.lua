-- Deliver one results line to its caller, or send the request back to intake for another attempt.
-- KEYS[1] request hash, KEYS[2] result key, KEYS[3] intake stream, KEYS[4] queue stats.
-- ARGV[1] attempt the line answers, ARGV[2] the line (JSON), ARGV[3] retry? ("1": the result is transient),
-- ARGV[4] max attempts, ARGV[5] result TTL (s), ARGV[6] pub/sub channel, ARGV[7] rid,
-- ARGV[8] the custom id of the next attempt (used only when the request is sent back).
-- Returns {code, enq_ms, attempts}: code 1 delivered, 2 requeued, 0 duplicate (already answered), -1 stale
-- (a line for an attempt that is not the current one, or a request batchd does not know).
-- NX and the attempt check make a repeated fan-out harmless: nothing is ever answered twice.
local f = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'enq', 'bytes', 'cancel', 'group')
local state, attempts = f[1], tonumber(f[2])
if redis.call('EXISTS', KEYS[2]) == 1 or state == 'done' then
  return {0, f[3] or 0, attempts or 0}
end
if not state or attempts ~= tonumber(ARGV[1]) or state == 'queued' then
  return {-1, 0, attempts or 0}
end
if ARGV[3] == '1' and attempts < tonumber(ARGV[4]) and not f[5] then
  local next_attempt = attempts + 1
  redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', next_attempt)
  redis.call('HDEL', KEYS[1], 'fid')
  if f[6] then
    redis.call('XADD', KEYS[3], '*', 'rid', ARGV[7], 'cid', ARGV[8], 'bytes', f[4], 'group', f[6])
  else
    redis.call('XADD', KEYS[3], '*', 'rid', ARGV[7], 'cid', ARGV[8], 'bytes', f[4])
  end
  redis.call('HINCRBY', KEYS[4], 'requests', 1)
  redis.call('HINCRBY', KEYS[4], 'bytes', tonumber(f[4]))
  return {2, f[3], next_attempt}
end
local ttl = tonumber(ARGV[5])
redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ttl)
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('HDEL', KEYS[1], 'body')
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {1, f[3], attempts}
