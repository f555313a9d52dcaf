-- Claim requests due in real time (records.Route): each is pushed back in the deadlines zset by a lease's
-- length, so no other replica claims it meanwhile, and one whose sender died is claimed again once that
-- passes. The sender then takes the request's real-time lease before it calls the API.
-- KEYS[1] deadlines zset. ARGV[1] now (ms), ARGV[2] at most this many, ARGV[3] ms a claim lasts,
-- ARGV[4] request key prefix, ARGV[5] real-time lease key prefix (the rid is appended to both).
-- A request that has its answer (or is gone) is dropped from the zset instead: a batch answered it first.
-- One whose real-time lease is held (a sender is calling for it) is due again when that lease lapses.
-- Returns {next due ms (-1: none), then per claim (6 each): rid, state, route, params JSON, group, attempts}.
local now, limit, push = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {-1}
if limit > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
  for _, rid in ipairs(due) do
    local f = redis.call('HMGET', ARGV[4] .. rid, 'state', 'route', 'body', 'group', 'attempts')
    local held = redis.call('PTTL', ARGV[5] .. rid)
    if not f[1] or f[1] == 'done' or f[1] == 'following' or not f[3] then
      redis.call('ZREM', KEYS[1], rid)
    elseif held >= 0 then
      -- PTTL is 0 in a lease's last millisecond: still held, so the sender's take would fail and the claim
      -- would hold the request back a whole lease. -1 (no expiry) is not a lease batchd writes.
      redis.call('ZADD', KEYS[1], now + math.max(held, 0) + 1, rid)
    else
      redis.call('ZADD', KEYS[1], now + push, rid)
      for _, v in ipairs({rid, f[1], f[2] or 'batch', f[3], f[4] or '', f[5] or '1'}) do
        out[#out + 1] = v
      end
    end
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then
  out[1] = first[2]
end
return out
