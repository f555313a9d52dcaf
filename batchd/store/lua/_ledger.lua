-- Shared by deliver.lua, enqueue.lua, cancel.lua and answer_realtime.lua: scripts.py pastes this file
-- where a script says "--#include _ledger". Amounts are integers in pico-USD, passed as strings and added by HINCRBY (Redis
-- adds 64-bit integers); in a Lua number (a double) only one request's own figures (an estimate, a cost), or
-- a deferred sum kept below 2^52, where a double is still exact.

-- Deferred increments (deliver.lua, a chunk of 500 lines): summed per key and field over the call and
-- written once each by flush_deferred() before the script returns, instead of a dozen HINCRBYs a line.
local deferred = false
local pending, pending_keys, pending_expire, pending_days = {}, {}, {}, {}
local EXACT = 4503599627370496 -- 2^52
-- A deferred ledger charge is summed as numbers per ledger key and field prefix (model|tag set|), one slot
-- per field below, and its field names are built once per prefix by flush_deferred (not ~10 a line).
local CHARGE_FIELDS = {'n', 'in', 'out', 'w5', 'w1', 'cr', 'st', 'cost', 'std', 'unp', 'nd', 'ndc'}
local pending_charges, pending_charge_keys = {}, {}

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
    local days = pending_days[dkey]
    if not days then
      days = {}
      pending_days[dkey] = days
    end
    days[day] = score
  else
    redis.call('ZADD', dkey, score, day)
  end
end

local function flush_deferred()
  for _, lkey in ipairs(pending_charge_keys) do
    for p, v in pairs(pending_charges[lkey]) do
      for j = 1, 12 do
        if v[j] ~= 0 then
          redis.call('HINCRBY', lkey, p .. CHARGE_FIELDS[j], string.format('%d', v[j]))
        end
      end
    end
  end
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
  for dkey, days in pairs(pending_days) do
    for day, score in pairs(days) do
      redis.call('ZADD', dkey, score, day)
    end
  end
  pending, pending_keys, pending_expire, pending_days = {}, {}, {}, {}
  pending_charges, pending_charge_keys = {}, {}
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
  if deferred then
    local by_prefix = pending_charges[lkey]
    if not by_prefix then
      by_prefix = {}
      pending_charges[lkey] = by_prefix
      pending_charge_keys[#pending_charge_keys + 1] = lkey
    end
    local v = by_prefix[p]
    if not v then
      v = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
      by_prefix[p] = v
    end
    v[1] = v[1] + 1
    for j = 2, 9 do
      v[j] = v[j] + tonumber(c[j])
    end
    if c[10] ~= '1' then
      v[10] = v[10] + 1
    end
    if not delivered then
      v[11] = v[11] + 1
      v[12] = v[12] + tonumber(c[8])
    end
    for j = 1, 12 do
      if v[j] >= EXACT then
        redis.call('HINCRBY', lkey, p .. CHARGE_FIELDS[j], string.format('%d', v[j]))
        v[j] = 0
      end
    end
    note_day(dkey, score, day)
    return
  end
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
  -- Deferred, incr adds numbers; else HINCRBY takes the amount as an integer string.
  local value = deferred and amount or string.format('%d', amount)
  for _, scope in ipairs(scopes) do
    incr(bkey, scope, value)
  end
  expire_later(bkey, ttl)
end
