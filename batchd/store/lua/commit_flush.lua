-- Move one chunk (<= 5000) of intake entries into a flush. Call again with more chunks; seal_flush ends it.
-- KEYS[1] intake stream, KEYS[2] queue stats, KEYS[3] flush hash, KEYS[4] flush rids list,
-- KEYS[5] flushes zset, then one request hash per entry.
-- ARGV[1] consumer group, ARGV[2] fid, ARGV[3] now (ms), ARGV[4] the flush's group (its requests' headers),
-- then per entry: stream id, rid.
-- A request moves only if it is still 'queued' (a canceled one, or one another replica already moved,
-- is just acknowledged), so a request belongs to exactly one flush.
-- Returns {moved, bytes}.
local fid, now = ARGV[2], ARGV[3]
local moved, bytes = 0, 0
local ids = {}
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[3], 'state', 'building', 'created', now, 'requests', 0, 'bytes', 0, 'group', ARGV[4])
  redis.call('ZADD', KEYS[5], now, fid)
end
local state = redis.call('HGET', KEYS[3], 'state')
if state ~= 'building' then
  return redis.error_reply('flush ' .. fid .. ' is ' .. tostring(state) .. ', not building')
end
for i = 5, #ARGV, 2 do
  local entry, rid = ARGV[i], ARGV[i + 1]
  local req = KEYS[5 + (i - 3) / 2]
  local fields = redis.call('HMGET', req, 'state', 'bytes')
  if fields[1] == 'queued' then
    redis.call('HSET', req, 'state', 'flushed', 'fid', fid)
    redis.call('RPUSH', KEYS[4], rid)
    moved = moved + 1
    bytes = bytes + tonumber(fields[2])
  end
  ids[#ids + 1] = entry
end
if #ids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
if moved > 0 then
  redis.call('HINCRBY', KEYS[3], 'requests', moved)
  redis.call('HINCRBY', KEYS[3], 'bytes', bytes)
  redis.call('HINCRBY', KEYS[2], 'requests', -moved)
  redis.call('HINCRBY', KEYS[2], 'bytes', -bytes)
end
return {moved, bytes}
