-- Charge one answer batchd did not get through a batch (a real-time call) to the ledger and to today's
-- budgets. The caller charges each answer once.
-- KEYS[1] today's ledger hash, KEYS[2] ledger days zset, KEYS[3] tag sets hash, KEYS[4] today's budget hash.
-- ARGV[1] today (UTC), ARGV[2] today as YYYYMMDD, ARGV[3] tag set id ("" untagged), ARGV[4] its canonical
-- "k=v,..." (registered if new), ARGV[5] budget TTL (s), ARGV[6] the charge (see _ledger.lua).
-- Returns 1.
--#include _ledger
if ARGV[3] ~= '' then
  redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[4])
end
local c = split_charge(ARGV[6])
ledger_charge(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], c, true)
budget_add(KEYS[4], budget_scopes(KEYS[3], ARGV[3]), tonumber(c[8]), tonumber(ARGV[5]))
return 1
