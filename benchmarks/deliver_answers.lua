-- The waiters benchmark's stand-in for deliver.lua: answer a chunk of requests the way it does, inside Redis
-- in one call (SET of each results line, then one PUBLISH of every answered rid joined by commas).
-- ARGV[1], ARGV[2] a result key's text before and after the rid, ARGV[3] delivered channel, ARGV[4], ARGV[5]
-- a line's text before and after its custom id, then per request: rid, custom id.
local rids = {}
for i = 6, #ARGV, 2 do
  redis.call('SET', ARGV[1] .. ARGV[i] .. ARGV[2], ARGV[4] .. ARGV[i + 1] .. ARGV[5], 'EX', 3600)
  rids[#rids + 1] = ARGV[i]
end
redis.call('PUBLISH', ARGV[3], table.concat(rids, ','))
return #rids
