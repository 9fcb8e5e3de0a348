-- leave.lua: deletes this hub's lease if it still holds the hub's epoch (graceful shutdown).
--
-- KEYS[1] this hub's lease (hub:{id})
-- ARGV[1] epoch
--
-- Reply: 1 if deleted, 0 if the lease was gone or held another epoch.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
