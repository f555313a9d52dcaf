-- Take one slot of a sliding-window rate limit shared by every replica and front.
-- KEYS[1] the window (zset of slot token -> time taken, ms).
-- ARGV[1] now (ms), ARGV[2] slots per window, ARGV[3] window (ms), ARGV[4] this slot's token (unique).
-- Returns 0 if the slot was taken, else how many ms until the oldest slot in the window frees.
local now, limit, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
