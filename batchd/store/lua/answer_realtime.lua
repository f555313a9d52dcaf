-- Answer a request with the outcome of its real-time call, and charge a succeeded one to the ledger and
-- today's budgets at what it cost (standard prices) whether or not it is delivered: the API billed the call.
-- KEYS[1] request hash, KEYS[2] result key, KEYS[3] queue stats, KEYS[4] deadlines zset, KEYS[5] today's
-- ledger hash, KEYS[6] ledger days zset, KEYS[7] tag sets hash.
-- ARGV[1] rid, ARGV[2] the results line (JSON), ARGV[3] its charge ("" unless it succeeded; see
-- _ledger.lua), ARGV[4] result TTL (s), ARGV[5] pub/sub channel, ARGV[6] today (UTC), ARGV[7] today as
-- YYYYMMDD, ARGV[8] budget key prefix (the day is appended), ARGV[9] budget TTL (s), ARGV[10] flush key
-- prefix (the fid is appended).
-- A request still queued leaves intake as a canceled one does (commit_flush acknowledges its entry); one in a
-- flush counts as fallen back there, and when every request the flush's batch was created with has fallen
-- back, the caller cancels the batch.
-- Returns {code, fallen back, sent, batch id}: code 1 delivered, 0 it already had its answer, -1 unknown;
-- the others describe the request's flush ("" / 0 when it had none).
--#include _ledger
local rid, line, charge, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local today, score, budget_prefix, budget_ttl = ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local f = redis.call('HMGET', KEYS[1], 'state', 'bytes', 'est', 'bday', 'tags', 'fid')
local state, tagset = f[1], f[5] or ''
local code = 1
if not state then
  code = -1
  if redis.call('EXISTS', KEYS[2]) == 1 then
    code = 0
  end
elseif state == 'done' or state == 'following' or redis.call('EXISTS', KEYS[2]) == 1 then
  code = 0
end
redis.call('ZREM', KEYS[4], rid)

local scopes = nil
if charge ~= '' then
  local c = split_charge(charge)
  ledger_charge(KEYS[5], KEYS[6], today, score, tagset, c, code == 1)
  scopes = budget_scopes(KEYS[7], tagset)
  budget_add(budget_prefix .. today, scopes, tonumber(c[8]), budget_ttl)
end
if code ~= 1 then
  return {code, 0, 0, ''}
end

if f[3] then
  -- Its reservation is settled now; a batch copy that lands later finds none to settle.
  budget_add(budget_prefix .. (f[4] or today), scopes or budget_scopes(KEYS[7], tagset), -tonumber(f[3]),
    budget_ttl)
  redis.call('HDEL', KEYS[1], 'est')
end
local fell, sent, batch = 0, 0, ''
if state == 'queued' then
  redis.call('HINCRBY', KEYS[3], 'requests', -1)
  redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(f[2]))
elseif state == 'flushed' and f[6] then
  -- Counted only once the batch exists: a request answered before the create is left out of its body, so
  -- the count never reaches `sent` while a request in the batch still waits.
  local flush = ARGV[10] .. f[6]
  local g = redis.call('HMGET', flush, 'sent', 'batch')
  if g[2] then
    fell = redis.call('HINCRBY', flush, 'fellback', 1)
    sent, batch = tonumber(g[1]) or 0, g[2]
  end
end
redis.call('SET', KEYS[2], line, 'NX', 'EX', ttl)
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('HDEL', KEYS[1], 'body')
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', ARGV[5], rid)
return {1, fell, sent, batch}
