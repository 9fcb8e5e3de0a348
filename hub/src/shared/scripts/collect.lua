-- collect.lua: retention: deletes tasks finished before the cutoff, oldest first (task hash,
-- idempotency key, index, finished and deadlines entries, listing indexes). Runs after the
-- apex_reindex prelude (reindex.lua).
--
-- KEYS[1] the finished set
-- KEYS[2] index
-- KEYS[3] deadlines
-- ARGV[1] cutoff (ms since the Unix epoch)
-- ARGV[2] at most this many tasks
-- ARGV[3] the task key prefix (apex:shared:task:)
--
-- Reply: how many tasks were deleted.

local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  local tk = ARGV[3] .. id
  local idem = redis.call('HGET', tk, 'idem')
  if idem then redis.call('DEL', idem) end
  apex_reindex(tk, id, false, false, false)
  redis.call('DEL', tk)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[3], id)
end
return #ids
