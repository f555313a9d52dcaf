-- Take or renew a lease. KEYS[1] lease key. ARGV[1] holder, ARGV[2] lease length (ms).
-- Returns 1 if ARGV[1] holds the lease now, 0 if another holder does.
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
