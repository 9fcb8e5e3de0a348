-- renew.lua: renews this hub's lease if it still holds the hub's epoch.
--
-- KEYS[1] this hub's lease (hub:{id})
-- ARGV[1] epoch
-- ARGV[2] lease lifetime (ms)
--
-- Reply: 1 if renewed, 0 if the lease is gone or holds another epoch.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
