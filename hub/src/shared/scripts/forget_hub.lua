-- forget_hub.lua: forgets a dead hub with nothing left (no lease, empty owned set).
--
-- KEYS[1] the hubs set
-- KEYS[2] its lease (hub:{id})
-- KEYS[3] its owned set (owned:{id})
-- ARGV[1] hub id
--
-- Reply: 1 if this call removed it from the hubs set, else 0.

if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('SCARD', KEYS[3]) > 0 then return 0 end
return redis.call('SREM', KEYS[1], ARGV[1])
