-- Move one chunk (<= 5000) of intake entries into a flush. Call again with more chunks; seal_flush ends it.
-- KEYS[1] intake stream, KEYS[2] queue stats, KEYS[3] flush hash, KEYS[4] flush rids list,
-- KEYS[5] flushes zset.
-- ARGV[1] consumer group, ARGV[2] fid, ARGV[3] now (ms), ARGV[4] the flush's group (its requests' headers),
-- ARGV[5] the stream id just after the chunk's newest entry, ARGV[6] the request hash key prefix (a request's
-- key is it and its rid), ARGV[7] the entries: "<stream id> <rid>" each, space-separated. (One argument:
-- redis-py packs 15,000 small arguments at ~3 us each, more than the script itself costs.)
-- A request moves only if it is still 'queued' (a canceled one, or one another replica already moved,
-- is just acknowledged), so a request belongs to exactly one flush.
-- Returns {moved, bytes}.
local fid, now = ARGV[2], ARGV[3]
local moved, bytes = 0, 0
local ids, rids = {}, {}
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[3], 'state', 'building', 'created', now, 'requests', 0, 'bytes', 0, 'group', ARGV[4])
  redis.call('ZADD', KEYS[5], now, fid)
end
local state = redis.call('HGET', KEYS[3], 'state')
if state ~= 'building' then
  return redis.error_reply('flush ' .. fid .. ' is ' .. tostring(state) .. ', not building')
end
local req_prefix = ARGV[6]
for entry, rid in string.gmatch(ARGV[7], '(%S+) (%S+)') do
  local req = req_prefix .. rid
  local fields = redis.call('HMGET', req, 'state', 'bytes')
  if fields[1] == 'queued' then
    redis.call('HSET', req, 'state', 'flushed', 'fid', fid)
    rids[#rids + 1] = rid
    bytes = bytes + tonumber(fields[2])
  end
  ids[#ids + 1] = entry
end
moved = #rids
if moved > 0 then
  redis.call('RPUSH', KEYS[4], unpack(rids))
end

-- Whether stream id a is below b: (ms, seq), each a decimal without leading zeros.
local function below(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if #ams ~= #bms then return #ams < #bms end
  if ams ~= bms then return ams < bms end
  if #aseq ~= #bseq then return #aseq < #bseq end
  return aseq < bseq
end

if #ids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  -- Acknowledged entries leave the stream. XDEL costs a scan of the entry's stream node per id (~6 us);
  -- XTRIM MINID drops whole nodes. Every entry below the group's oldest pending one was read (the chunk's
  -- entries were, and the group reads in id order) and acknowledged, and this script deletes whatever it
  -- acknowledges, so trimming below both that and the chunk's newest entry removes the chunk and nothing
  -- else. Entries of the chunk above an older pending entry (one held for priming, a dead replica's) are
  -- deleted one by one.
  local oldest = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
  if oldest and below(oldest, ARGV[5]) then
    redis.call('XTRIM', KEYS[1], 'MINID', oldest)
    redis.call('XDEL', KEYS[1], unpack(ids))
  else
    redis.call('XTRIM', KEYS[1], 'MINID', ARGV[5])
  end
end
if moved > 0 then
  redis.call('HINCRBY', KEYS[3], 'requests', moved)
  redis.call('HINCRBY', KEYS[3], 'bytes', bytes)
  redis.call('HINCRBY', KEYS[2], 'requests', -moved)
  redis.call('HINCRBY', KEYS[2], 'bytes', -bytes)
end
return {moved, bytes}
