-- commit.lua: writes the record of a task this hub holds, only if the hub's lease still holds
-- its epoch and the task's owner, epoch and claim are this claim's (the fencing token). Next
-- state done releases the task into the finished set; queued hands it back to its queue (for
-- any hub); claimed keeps the claim. Publishes the task id on the events channel (and the queue
-- on the wake channel when handed back). Runs after the apex_reindex prelude (reindex.lua).
--
-- KEYS[1] the task hash
-- KEYS[2] this hub's lease (hub:{id})
-- KEYS[3] its owned set (owned:{id})
-- KEYS[4] the task's queue
-- KEYS[5] the finished set
-- ARGV[1] hub id
-- ARGV[2] epoch
-- ARGV[3] the claim it is held under
-- ARGV[4] record
-- ARGV[5] next state (claimed, done or queued)
-- ARGV[6] queue score (-priority)
-- ARGV[7] task id
-- ARGV[8] events channel
-- ARGV[9] wake channel
-- ARGV[10] now (ms, the finish time for done)
-- ARGV[11] the record's status (listing indexes)
-- ARGV[12] its tool
-- ARGV[13] its node ('' if none)
--
-- Reply: 1 (also, writing nothing, when the task is released already with exactly this
-- record: a retried batch), or an error starting FENCED.

local done = redis.call('HMGET', KEYS[1], 'state', 'record')
if done[1] ~= 'claimed' and done[2] == ARGV[4] then return 1 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return redis.error_reply('FENCED the hub lease is lost')
end
local h = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'claim', 'state', 'member')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= ARGV[3] or h[4] ~= 'claimed' then
  return redis.error_reply('FENCED the task is not held by this claim')
end
redis.call('HSET', KEYS[1], 'record', ARGV[4])
apex_reindex(KEYS[1], ARGV[7], ARGV[11], ARGV[12], ARGV[13])
if ARGV[5] ~= 'claimed' then
  redis.call('HSET', KEYS[1], 'state', ARGV[5])
  redis.call('HDEL', KEYS[1], 'owner', 'epoch')
  redis.call('SREM', KEYS[3], ARGV[7])
  if ARGV[5] == 'queued' then
    redis.call('ZADD', KEYS[4], ARGV[6], h[5])
    redis.call('PUBLISH', ARGV[9], KEYS[4])
  else
    redis.call('ZADD', KEYS[5], ARGV[10], ARGV[7])
  end
end
redis.call('PUBLISH', ARGV[8], ARGV[7])
return 1
