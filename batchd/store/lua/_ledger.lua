-- Shared by deliver.lua, enqueue.lua, cancel.lua and answer_realtime.lua: scripts.py pastes this file
-- where a script says "--#include _ledger". Amounts are integers in pico-USD, passed as strings and added by HINCRBY (Redis
-- adds 64-bit integers); in a Lua number (a double) only one request's own figures (an estimate, a cost), or
-- a deferred sum kept below 2^52, where a double is still exact.

-- Deferred increments (deliver.lua, a chunk of 500 lines): summed per key and field over the call and
-- written once each by flush_deferred() before the script returns, instead of a dozen HINCRBYs a line.
local deferred = false
local pending, pending_keys, pending_expire, pending_days = {}, {}, {}, {}
local EXACT = 4503599627370496 -- 2^52

local function incr(key, field, amount)
  if not deferred then
    redis.call('HINCRBY', key, field, amount)
    return
  end
  local h = pending[key]
  if not h then
    h = {}
    pending[key] = h
    pending_keys[#pending_keys + 1] = key
  end
  local v = (h[field] or 0) + tonumber(amount)
  if v >= EXACT or v <= -EXACT then
    redis.call('HINCRBY', key, field, string.format('%d', v))
    v = 0
  end
  h[field] = v
end

local function expire_later(key, ttl)
  if deferred then
    pending_expire[key] = ttl
  else
    redis.call('EXPIRE', key, ttl)
  end
end

local function note_day(dkey, score, day)
  if deferred then
    pending_days[dkey .. '\0' .. day] = {dkey, score, day}
  else
    redis.call('ZADD', dkey, score, day)
  end
end

local function flush_deferred()
  for _, key in ipairs(pending_keys) do
    for field, v in pairs(pending[key]) do
      if v ~= 0 then
        redis.call('HINCRBY', key, field, string.format('%d', v))
      end
    end
  end
  for key, ttl in pairs(pending_expire) do
    redis.call('EXPIRE', key, ttl)
  end
  for _, d in pairs(pending_days) do
    redis.call('ZADD', d[1], d[2], d[3])
  end
  pending, pending_keys, pending_expire, pending_days = {}, {}, {}, {}
end

-- A ledger charge, from its form on the wire: model, input, output, cache writes 5m and 1h, cache reads,
-- server-tool uses, cost, standard cost, priced ("1"/"0"), joined by tabs (records.Charge.blob).
local function split_charge(blob)
  local c = {}
  for field in string.gmatch(blob, '[^\t]+') do
    c[#c + 1] = field
  end
  return c
end

-- Add one billed answer to a day's ledger, under its model and tag set id. `delivered`: batchd delivered it
-- (false: the API billed a line batchd dropped, a stale or duplicate one).
local function ledger_charge(lkey, dkey, day, score, tagset, c, delivered)
  local p = c[1] .. '|' .. tagset .. '|'
  local names = {'in', 'out', 'w5', 'w1', 'cr', 'st', 'cost', 'std'}
  incr(lkey, p .. 'n', 1)
  for j = 1, 8 do
    if c[j + 1] ~= '0' then
      incr(lkey, p .. names[j], c[j + 1])
    end
  end
  if c[10] ~= '1' then
    incr(lkey, p .. 'unp', 1)
  end
  if not delivered then
    incr(lkey, p .. 'nd', 1)
    if c[8] ~= '0' then
      incr(lkey, p .. 'ndc', c[8])
    end
  end
  note_day(dkey, score, day)
end

-- A request answered without being sent (dedupe): it saved `std`, the standard cost of the answer it reused.
local function ledger_reuse(lkey, dkey, day, score, tagset, model, std)
  local p = model .. '|' .. tagset .. '|'
  incr(lkey, p .. 'rn', 1)
  if std and std ~= '0' and std ~= '' then
    incr(lkey, p .. 'rs', std)
  end
  note_day(dkey, score, day)
end

-- The budget scopes a request counts against: "*" and each "key=value" of its tag set.
local function budget_scopes(tagsets_key, tagset)
  local scopes = {'*'}
  if tagset and tagset ~= '' then
    local canonical = redis.call('HGET', tagsets_key, tagset)
    if canonical then
      for item in string.gmatch(canonical, '[^,]+') do
        scopes[#scopes + 1] = item
      end
    end
  end
  return scopes
end

-- Add `amount` (pico-USD, may be negative) to every scope of a day's budget hash.
local function budget_add(bkey, scopes, amount, ttl)
  if amount == 0 then
    return
  end
  local text = string.format('%d', amount)
  for _, scope in ipairs(scopes) do
    incr(bkey, scope, text)
  end
  expire_later(bkey, ttl)
end
