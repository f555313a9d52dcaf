-- Shared by deliver.lua, enqueue.lua, cancel.lua and answer_realtime.lua: scripts.py pastes this file
-- where a script says "--#include _ledger". Amounts are integers in pico-USD, passed as strings and added by HINCRBY (Redis
-- adds 64-bit integers); only one request's own figures (an estimate, a cost) ever pass through a Lua number.

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
  redis.call('HINCRBY', lkey, p .. 'n', 1)
  for j = 1, 8 do
    if c[j + 1] ~= '0' then
      redis.call('HINCRBY', lkey, p .. names[j], c[j + 1])
    end
  end
  if c[10] ~= '1' then
    redis.call('HINCRBY', lkey, p .. 'unp', 1)
  end
  if not delivered then
    redis.call('HINCRBY', lkey, p .. 'nd', 1)
    if c[8] ~= '0' then
      redis.call('HINCRBY', lkey, p .. 'ndc', c[8])
    end
  end
  redis.call('ZADD', dkey, score, day)
end

-- A request answered without being sent (dedupe): it saved `std`, the standard cost of the answer it reused.
local function ledger_reuse(lkey, dkey, day, score, tagset, model, std)
  local p = model .. '|' .. tagset .. '|'
  redis.call('HINCRBY', lkey, p .. 'rn', 1)
  if std and std ~= '0' and std ~= '' then
    redis.call('HINCRBY', lkey, p .. 'rs', std)
  end
  redis.call('ZADD', dkey, score, day)
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
    redis.call('HINCRBY', bkey, scope, text)
  end
  redis.call('EXPIRE', bkey, ttl)
end
