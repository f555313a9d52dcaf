-- Submit one or more requests atomically (all of the call or none of it).
-- KEYS[1] intake stream, KEYS[2] queue stats hash, KEYS[3] groups hash, KEYS[4] tag sets hash, KEYS[5]
-- today's budget hash, KEYS[6] today's ledger hash, KEYS[7] ledger days zset, KEYS[8] deadlines zset.
-- ARGV[1] now (ms), ARGV[2] max queued requests, ARGV[3] max queued bytes, ARGV[4] today (UTC), ARGV[5]
-- today as YYYYMMDD, ARGV[6] budget TTL (s), ARGV[7] result TTL (s), ARGV[8] dedupe key prefix (the
-- digest is appended), ARGV[9] request key prefix (the rid is appended), ARGV[10] and ARGV[11] what comes
-- before and after the rid in its result key, ARGV[12] the real-time senders' wake channel, ARGV[13] the
-- global daily budget (pico-USD, "" for none), ARGV[14] L, then L pairs (tag scope, its daily budget), then G, then G pairs (group id, its headers
-- JSON), then T, then T pairs (tag set id, its canonical "k=v,..."), then per request (2 each): its small
-- fields joined by tabs (rid, custom id of attempt 1, digest (params and headers), group id ("" for the
-- default headers), tag set id, estimate (pico-USD), prompt-cache prefix id, its TTL (s), dedupe ("1":
-- follow or reuse an identical request), route ("" for batch, else the records.Route) and the ms it is
-- due in real time), then its params JSON. Joined, because redis-py packs and Redis converts every argument
-- on its own: one string of small fields costs about what one of them did.
-- A realtime or auto_now request never enters intake (state 'realtime'); an auto one does, and is also
-- listed in the deadlines zset. A call that lists any wakes the senders (they sleep until woken or due).
-- Returns {-1, queued_n, queued_bytes} if the caps would be passed, {-2, i} if request i (1-based) reuses
-- a known request id with other params, {-3, i, scope, spent, limit} if request i's estimate would take a
-- budget past its limit (nothing written in any of these); else one code per request: 1 queued, 0 that
-- request id already exists with the same params (idempotent submit), 2 deduped onto an identical request
-- in flight (answered with its answer), 3 answered at once with an identical request's stored answer.
-- All reads come before the first write: under maxmemory/noeviction Redis refuses a script at its first
-- write, so an out-of-memory error leaves nothing half-written.
--#include _ledger
local now, today, score = ARGV[1], ARGV[4], ARGV[5]
local budget_ttl, result_ttl, dedupe_prefix = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local req_prefix, res_head, res_tail, wake = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local limits = {}
if ARGV[13] ~= '' then
  limits['*'] = tonumber(ARGV[13])
end
local at = 14
for _ = 1, tonumber(ARGV[at]) do
  limits[ARGV[at + 1]] = tonumber(ARGV[at + 2])
  at = at + 2
end
at = at + 1
local ngroups = tonumber(ARGV[at])
local groups_at = at
at = at + 1 + 2 * ngroups
local ntags = tonumber(ARGV[at])
local tagsets = {}
for t = 1, ntags do
  tagsets[ARGV[at + (t - 1) * 2 + 1]] = ARGV[at + (t - 1) * 2 + 2]
end
local first = at + 2 * ntags  -- the ARGV index before the first request's
local nreq = (#ARGV - first) / 2
-- A request's small fields: rid, cid, digest, group, tag set, estimate, prefix, its TTL, dedupe, route, due.
local FIELDS = '^([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]*)\t([^\t]*)\t(%d+)\t([^\t]*)\t(%d+)\t([01])\t([^\t]*)\t(%d+)$'
local stats = redis.call('HMGET', KEYS[2], 'requests', 'bytes')
local queued_n = tonumber(stats[1]) or 0
local queued_bytes = tonumber(stats[2]) or 0

-- The budget scopes of a tag set id: "*" and each tag (from this call's tag sets).
local scopes_cache = {}
local function scopes_of(tagset)
  local scopes = scopes_cache[tagset]
  if scopes then
    return scopes
  end
  scopes = {'*'}
  local canonical = tagsets[tagset]
  if canonical then
    for item in string.gmatch(canonical, '[^,]+') do
      scopes[#scopes + 1] = item
    end
  end
  scopes_cache[tagset] = scopes
  return scopes
end

-- Each request's record and result keys. One EXISTS a slice of requests: new requests (the usual case) cost
-- no read of their own; only the requests of a slice where some key exists are looked at one by one.
local reqs, ress, suspect = {}, {}, {}
for s = 1, nreq, 100 do
  local e = math.min(s + 99, nreq)
  local names = {}
  for i = s, e do
    local rid = string.match(ARGV[first + 2 * i - 1], '^[^\t]+')
    reqs[i], ress[i] = req_prefix .. rid, res_head .. rid .. res_tail
    names[#names + 1], names[#names + 2] = reqs[i], ress[i]
  end
  if redis.call('EXISTS', unpack(names)) > 0 then
    for i = s, e do
      suspect[i] = true
    end
  end
end

local codes, dds = {}, {}
local add_n, add_bytes = 0, 0
local listed = false  -- a request was listed in the deadlines zset
local seen = {}
local primary_of = {}  -- dedupe key -> rid of the request of this call that carries it
local reuse = {}  -- i -> {line, model, standard cost}
local spent, reserve = {}, {}  -- scope -> pico-USD spent before this call / reserved by it
for i = 1, nreq do
  local body = ARGV[first + 2 * i]
  local rid, _, digest, _, tagset, est, _, _, dedupe, route = string.match(ARGV[first + 2 * i - 1], FIELDS)
  est = tonumber(est)
  local known = seen[rid]
  -- A request answered long ago may keep only its result; its digest went with its record.
  if not known and suspect[i] and redis.call('EXISTS', reqs[i], ress[i]) > 0 then
    known = redis.call('HGET', reqs[i], 'digest') or digest
  end
  if known then
    if known ~= digest then
      return {-2, i}
    end
    codes[i] = 0
  else
    seen[rid] = digest
    codes[i] = 1
    if dedupe == '1' then
      local dd = dedupe_prefix .. digest
      dds[i] = dd
      if primary_of[dd] then
        codes[i] = 2
      else
        local r = redis.call('HMGET', dd, 'rid', 'req', 'res', 'ok', 'std', 'model')
        if r[1] and r[4] == '1' then
          local line = redis.call('GET', r[3])
          if line then
            codes[i] = 3
            reuse[i] = {line, r[6] or 'unknown', r[5] or '0'}
          end
        elseif r[1] then
          local leader = redis.call('HGET', r[2], 'state')
          if leader == 'queued' or leader == 'flushed' then
            codes[i] = 2
          end
        end
      end
      if codes[i] == 1 then
        primary_of[dd] = rid
      end
    end
    if codes[i] == 1 then
      if route == '' or route == 'auto' then
        add_n = add_n + 1
        add_bytes = add_bytes + #body
      end
      if est > 0 then
        local scopes = scopes_of(tagset)
        for _, scope in ipairs(scopes) do
          local limit = limits[scope]
          if limit then
            if spent[scope] == nil then
              spent[scope] = tonumber(redis.call('HGET', KEYS[5], scope) or '0')
            end
            local before = spent[scope] + (reserve[scope] or 0)
            if before + est > limit then
              return {-3, i, scope, string.format('%d', before), string.format('%d', limit)}
            end
          end
        end
        for _, scope in ipairs(scopes) do
          reserve[scope] = (reserve[scope] or 0) + est
        end
      end
    end
  end
end

if add_n > 0 and (queued_n + add_n > tonumber(ARGV[2]) or queued_bytes + add_bytes > tonumber(ARGV[3])) then
  return {-1, queued_n, queued_bytes}
end

for g = 1, ngroups do
  redis.call('HSETNX', KEYS[3], ARGV[groups_at + (g - 1) * 2 + 1], ARGV[groups_at + (g - 1) * 2 + 2])
end
for id, canonical in pairs(tagsets) do
  redis.call('HSETNX', KEYS[4], id, canonical)
end
for i = 1, nreq do
  local code = codes[i]
  if code ~= 0 then
    local body = ARGV[first + 2 * i]
    local rid, cid, digest, group, tagset, est, pfx, pttl, _, route, due =
      string.match(ARGV[first + 2 * i - 1], FIELDS)
    local req, res = reqs[i], ress[i]
    local dd = dds[i]
    if code == 1 then
      local direct = route ~= '' and route ~= 'auto'
      local state = 'queued'
      if direct then
        state = 'realtime'
      end
      local fields = {'body', body, 'bytes', #body, 'digest', digest, 'state', state, 'attempts', 1, 'enq', now}
      if group ~= '' then
        fields[#fields + 1], fields[#fields + 2] = 'group', group
      end
      if pfx ~= '' then
        fields[#fields + 1], fields[#fields + 2] = 'pfx', pfx
        fields[#fields + 1], fields[#fields + 2] = 'pttl', pttl
      end
      if tagset ~= '' then
        fields[#fields + 1], fields[#fields + 2] = 'tags', tagset
      end
      if est ~= '0' then
        fields[#fields + 1], fields[#fields + 2] = 'est', est
        fields[#fields + 1], fields[#fields + 2] = 'bday', today
      end
      if dd and primary_of[dd] == rid then
        fields[#fields + 1], fields[#fields + 2] = 'dd', dd
        -- No expiry while it is in flight: deliver.lua sets the window (or deletes it) once it is answered.
        redis.call('DEL', dd)
        redis.call('HSET', dd, 'rid', rid, 'req', req, 'res', res)
      end
      if route ~= '' then
        fields[#fields + 1], fields[#fields + 2] = 'route', route
        redis.call('ZADD', KEYS[8], due, rid)
        listed = true
      end
      redis.call('HSET', req, unpack(fields))
      if not direct then
        if group == '' and pfx == '' then
          redis.call('XADD', KEYS[1], '*', 'rid', rid, 'cid', cid, 'bytes', #body)
        else
          local entry = {'rid', rid, 'cid', cid, 'bytes', #body}
          if group ~= '' then
            entry[#entry + 1], entry[#entry + 2] = 'group', group
          end
          if pfx ~= '' then
            entry[#entry + 1], entry[#entry + 2] = 'pfx', pfx
          end
          redis.call('XADD', KEYS[1], '*', unpack(entry))
        end
      end
    elseif code == 2 then
      redis.call('HSET', req, 'digest', digest, 'state', 'following', 'enq', now, 'dd', dd)
      if tagset ~= '' then
        redis.call('HSET', req, 'tags', tagset)
      end
      redis.call('HSET', dd, 'f:' .. rid, req .. '\t' .. res .. '\t' .. tagset)
    elseif code == 3 then
      local reused = reuse[i]
      redis.call('SET', res, reused[1], 'NX', 'EX', result_ttl)
      redis.call('HSET', req, 'digest', digest, 'state', 'done', 'enq', now)
      redis.call('EXPIRE', req, result_ttl)
      ledger_reuse(KEYS[6], KEYS[7], today, score, tagset, reused[2], reused[3])
    end
  end
end
-- Every estimate queued is reserved against today's budgets (settled by deliver.lua).
local reserved = false
for scope, amount in pairs(reserve) do
  redis.call('HINCRBY', KEYS[5], scope, string.format('%d', amount))
  reserved = true
end
if reserved then
  redis.call('EXPIRE', KEYS[5], budget_ttl)
end
if add_n > 0 then
  redis.call('HINCRBY', KEYS[2], 'requests', add_n)
  redis.call('HINCRBY', KEYS[2], 'bytes', add_bytes)
end
if listed then
  redis.call('PUBLISH', wake, '')
end
return codes
