-- Which requests batchd has no record of (neither the request's hash nor its answer): the result waiter's
-- check of new and swept waiters, one call per chunk of ids instead of an EXISTS each.
-- KEYS: per request, its hash then its result key.
-- Returns the positions (1-based, per request) of the unknown ones: almost always none.
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i], KEYS[i + 1]) == 0 then
    out[#out + 1] = (i + 1) / 2
  end
end
return out
