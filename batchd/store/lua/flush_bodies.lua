-- The params of a chunk of a flush's requests, in order, in one reply (false where a request has none):
-- the create body is streamed from these, a chunk at a time.
-- KEYS: the request hashes.
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGET', key, 'body')
end
return out
