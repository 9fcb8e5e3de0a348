-- finish_queued.lua: finishes a task that waits in a queue, no hub holding it (cancel,
-- timeout): removes it from its queue, writes its terminal record, state done, adds it to the
-- finished set, publishes its id on the events channel. Runs after the apex_reindex prelude
-- (reindex.lua).
--
-- KEYS[1] the task hash
-- KEYS[2] its queue
-- KEYS[3] the finished set
-- ARGV[1] the terminal record
-- ARGV[2] task id
-- ARGV[3] events channel
-- ARGV[4] now (ms, the finish time)
-- ARGV[5] the record's status (listing indexes)
-- ARGV[6] its tool
-- ARGV[7] its node ('' if none)
--
-- Reply: 1, or 0 if the task is not queued (claimed by a hub, or finished): nothing written.

local h = redis.call('HMGET', KEYS[1], 'state', 'member')
if h[1] ~= 'queued' then return 0 end
redis.call('ZREM', KEYS[2], h[2])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'state', 'done')
apex_reindex(KEYS[1], ARGV[2], ARGV[5], ARGV[6], ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
