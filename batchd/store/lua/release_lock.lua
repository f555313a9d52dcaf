-- Release a lock only if ARGV[1] still holds it (it may have expired and been taken by another).
-- KEYS[1] lock key. Returns 1 if released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
