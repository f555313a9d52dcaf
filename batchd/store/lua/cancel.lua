-- Cancel one request. KEYS[1] request hash, KEYS[2] result key, KEYS[3] queue stats, KEYS[4] tag sets hash.
-- ARGV[1] canceled results line (JSON), ARGV[2] result TTL (s), ARGV[3] pub/sub channel, ARGV[4] rid,
-- ARGV[5] budget key prefix (the request's budget day is appended), ARGV[6] budget TTL (s).
-- Returns 1 if it will never reach the API on its behalf (still queued: removed; or deduped onto another
-- request: detached from it), 2 if it may still be processed and billed (already flushed, or routed to real
-- time, whose call may be under way: answered canceled now, and the API's later answer is dropped; or other
-- deduped callers still wait on it: it goes on for them), 0 if it already had its answer, -1 if there is no
-- such request.
--#include _ledger
local f = redis.call('HMGET', KEYS[1], 'state', 'bytes', 'cancel', 'est', 'bday', 'tags', 'dd')
local state = f[1]
if not state then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
  end
  return -1
end
if state == 'done' or f[3] then
  return 0
end
local ttl = tonumber(ARGV[2])

local function answer_canceled()
  redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ttl)
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end

if state == 'following' then
  -- Its record stays listed on the request it follows, which skips callers no longer following.
  redis.call('HSET', KEYS[1], 'state', 'done', 'cancel', 1)
  redis.call('EXPIRE', KEYS[1], ttl)
  answer_canceled()
  return 1
end

-- A deduped request that others follow is not withdrawn: its caller is answered, the work goes on for them.
local owns_record = false
if f[7] then
  local record = redis.call('HGETALL', f[7])
  for i = 1, #record, 2 do
    if record[i] == 'rid' and record[i + 1] == ARGV[4] then
      owns_record = true
    end
  end
  if owns_record then
    for i = 1, #record, 2 do
      if string.sub(record[i], 1, 2) == 'f:' then
        local req_key = string.match(record[i + 1], '^([^\t]*)\t')
        if req_key and redis.call('HGET', req_key, 'state') == 'following' then
          redis.call('HSET', KEYS[1], 'cancel', 1)
          answer_canceled()
          return 2
        end
      end
    end
    -- Nobody follows it: identical requests from now on must not follow a canceled request.
    redis.call('DEL', f[7])
  end
end

local code = 2
if state == 'queued' or state == 'realtime' then
  if state == 'queued' then
    code = 1
    -- Its stream entry stays; commit_flush acknowledges it without moving it.
    redis.call('HINCRBY', KEYS[3], 'requests', -1)
    redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(f[2]))
  end
  -- A routed request may be mid-call (2: it may still be billed; answer_realtime.lua charges it then).
  redis.call('HDEL', KEYS[1], 'body')
  if f[4] then
    -- Not sent (yet): its budget reservation is released. (A flushed one keeps it until its line settles it.)
    budget_add(ARGV[5] .. f[5], budget_scopes(KEYS[4], f[6]), -tonumber(f[4]), tonumber(ARGV[6]))
    redis.call('HDEL', KEYS[1], 'est')
  end
end
redis.call('HSET', KEYS[1], 'state', 'done', 'cancel', 1)
redis.call('EXPIRE', KEYS[1], ttl)
answer_canceled()
return code
