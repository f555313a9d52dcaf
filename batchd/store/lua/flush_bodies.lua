-- The params of a chunk of a flush's requests, in order, in one reply (false where a request has none):
-- the create body is streamed from these, a chunk at a time, when Redis's ACLs refuse the connection's user
-- the faster `SORT_RO ... GET` (see Store._flush_params).
-- KEYS: the request hashes.
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGET', key, 'body')
end
return out
