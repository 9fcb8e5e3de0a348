-- requeue.lua: the reaper's step for one task of a dead hub: writes its next record (back to
-- its queue, or done when it used all its attempts) only if the owner's lease no longer holds
-- the claiming epoch and the claim is unchanged (so it excludes that hub's commits and
-- take_over.lua). Publishes the task id on the events channel (and the queue on the wake
-- channel when requeued). Runs after the apex_reindex prelude (reindex.lua).
--
-- KEYS[1] the task hash
-- KEYS[2] its owner's lease (hub:{owner})
-- KEYS[3] its owner's owned set (owned:{owner})
-- KEYS[4] its queue
-- KEYS[5] the finished set
-- ARGV[1] owner (hub id)
-- ARGV[2] the claiming epoch
-- ARGV[3] the claim as read
-- ARGV[4] the next record
-- ARGV[5] next state (queued or done)
-- ARGV[6] queue score (-priority)
-- ARGV[7] task id
-- ARGV[8] events channel
-- ARGV[9] wake channel
-- ARGV[10] now (ms, the finish time for done)
-- ARGV[11] the record's status (listing indexes)
-- ARGV[12] its tool
-- ARGV[13] its node ('' if none)
--
-- Reply: 1, or 0 if the claim is alive or gone (nothing written).

if redis.call('GET', KEYS[2]) == ARGV[2] then return 0 end
local h = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'claim', 'state', 'member')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= ARGV[3] or h[4] ~= 'claimed' then
  return 0
end
redis.call('HSET', KEYS[1], 'record', ARGV[4], 'state', ARGV[5])
apex_reindex(KEYS[1], ARGV[7], ARGV[11], ARGV[12], ARGV[13])
redis.call('HDEL', KEYS[1], 'owner', 'epoch')
redis.call('SREM', KEYS[3], ARGV[7])
if ARGV[5] == 'queued' then
  redis.call('ZADD', KEYS[4], ARGV[6], h[5])
  redis.call('PUBLISH', ARGV[9], KEYS[4])
else
  redis.call('ZADD', KEYS[5], ARGV[10], ARGV[7])
end
redis.call('PUBLISH', ARGV[8], ARGV[7])
return 1
