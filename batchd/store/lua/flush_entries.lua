-- Which requests of a flush are still waiting in it, with their attempt and the size of their params: one
-- call per chunk of the flush's request ids, so sizing a 100,000-request body costs a hundred round trips
-- and no per-request reply parsing.
-- KEYS: the request hashes. ARGV[1] the flush id.
-- Returns, flattened, per request still `flushed` in this flush and holding its params: its position in KEYS
-- (1-based), its attempt, its params' size in bytes.
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'state', 'fid', 'attempts')
  if f[1] == 'flushed' and f[2] == ARGV[1] then
    local size = redis.call('HSTRLEN', key, 'body')
    if size > 0 then
      out[#out + 1] = i
      out[#out + 1] = tonumber(f[3])
      out[#out + 1] = size
    end
  end
end
return out
