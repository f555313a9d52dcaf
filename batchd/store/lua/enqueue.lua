-- Submit one or more requests atomically (all of the call or none of it).
-- KEYS[1] intake stream, KEYS[2] queue stats hash, KEYS[3] groups hash, then per request: request hash,
-- result key.
-- ARGV[1] now (ms), ARGV[2] max queued requests, ARGV[3] max queued bytes, ARGV[4] G, then G pairs
-- (group id, its headers JSON), then per request: rid, custom id of attempt 1, params JSON, params digest,
-- group id ("" for the default headers).
-- Returns {-1, queued_n, queued_bytes} if the caps would be passed, {-2, i} if request i (1-based) reuses
-- a known request id with other params (nothing written in either case); else a list with 1 (new) or
-- 0 (that request id already exists with the same params: idempotent submit) per request.
-- All reads come before the first write: under maxmemory/noeviction Redis refuses a script at its first
-- write, so an out-of-memory error leaves nothing half-written.
local now = ARGV[1]
local ngroups = tonumber(ARGV[4])
local first = 4 + 2 * ngroups  -- the ARGV index before the first request's
local nreq = (#ARGV - first) / 5
local stats = redis.call('HMGET', KEYS[2], 'requests', 'bytes')
local queued_n = tonumber(stats[1]) or 0
local queued_bytes = tonumber(stats[2]) or 0

local fresh = {}
local add_n, add_bytes = 0, 0
local seen = {}
for i = 1, nreq do
  local base = first + (i - 1) * 5
  local rid, body, digest = ARGV[base + 1], ARGV[base + 3], ARGV[base + 4]
  local known = seen[rid]
  if not known then
    -- A request answered long ago may keep only its result; its digest went with its record.
    local stored = redis.call('HGET', KEYS[3 + (i - 1) * 2 + 1], 'digest')
    if stored then
      known = stored
    elseif redis.call('EXISTS', KEYS[3 + (i - 1) * 2 + 1]) == 1
        or redis.call('EXISTS', KEYS[3 + (i - 1) * 2 + 2]) == 1 then
      known = digest
    end
  end
  if known then
    if known ~= digest then
      return {-2, i}
    end
    fresh[i] = 0
  else
    fresh[i] = 1
    seen[rid] = digest
    add_n = add_n + 1
    add_bytes = add_bytes + #body
  end
end

if add_n > 0 and (queued_n + add_n > tonumber(ARGV[2]) or queued_bytes + add_bytes > tonumber(ARGV[3])) then
  return {-1, queued_n, queued_bytes}
end

for g = 1, ngroups do
  redis.call('HSETNX', KEYS[3], ARGV[4 + (g - 1) * 2 + 1], ARGV[4 + (g - 1) * 2 + 2])
end
for i = 1, nreq do
  if fresh[i] == 1 then
    local base = first + (i - 1) * 5
    local rid, cid, body, digest, group = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4],
      ARGV[base + 5]
    local req = KEYS[3 + (i - 1) * 2 + 1]
    redis.call('HSET', req, 'body', body, 'bytes', #body, 'digest', digest, 'state', 'queued', 'attempts', 1,
      'enq', now)
    if group ~= '' then
      redis.call('HSET', req, 'group', group)
      redis.call('XADD', KEYS[1], '*', 'rid', rid, 'cid', cid, 'bytes', #body, 'group', group)
    else
      redis.call('XADD', KEYS[1], '*', 'rid', rid, 'cid', cid, 'bytes', #body)
    end
  end
end
if add_n > 0 then
  redis.call('HINCRBY', KEYS[2], 'requests', add_n)
  redis.call('HINCRBY', KEYS[2], 'bytes', add_bytes)
end
return fresh
