-- submit.lua: stores one new task (status queued) and queues it; an idempotency key already
-- used (at any hub) writes nothing and names the existing task. Publishes the queue key on the
-- wake channel. Runs after the apex_reindex prelude (reindex.lua).
--
-- KEYS[1] the task hash (apex:shared:task:{id})
-- KEYS[2] its queue (queue:{tool} or pinned:{node})
-- KEYS[3] the seq counter
-- KEYS[4] the idempotency key (idem:{key}; any name when unused)
-- KEYS[5] index, every task id by seq
-- KEYS[6] deadlines
-- ARGV[1] task id
-- ARGV[2] record (the Task JSON)
-- ARGV[3] queue score (-priority)
-- ARGV[4] '1' if KEYS[4] is used
-- ARGV[5] wake channel
-- ARGV[6] deadline (ms since the Unix epoch)
-- ARGV[7] the record's status (listing indexes)
-- ARGV[8] its tool
-- ARGV[9] its node ('' if none)
-- ARGV[10] its owner ('' if none): listed in ix:owner:{owner}, kept in the hash as ix_o
--
-- Reply: {'1', id, seq} for a new task, {'0', existing id, ''} if the key was used before.

if ARGV[4] == '1' then
  local ok = redis.call('SET', KEYS[4], ARGV[1], 'NX')
  if not ok then
    return {'0', redis.call('GET', KEYS[4]), ''}
  end
end
local seq = redis.call('INCR', KEYS[3])
local member = string.format('%020d', seq) .. ':' .. ARGV[1]
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'state', 'queued', 'queue', KEYS[2],
  'member', member, 'claim', '0')
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'idem', KEYS[4]) end
redis.call('ZADD', KEYS[2], ARGV[3], member)
redis.call('ZADD', KEYS[5], seq, ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[6], ARGV[1])
apex_reindex(KEYS[1], ARGV[1], ARGV[7], ARGV[8], ARGV[9])
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[1], 'ix_o', ARGV[10])
  redis.call('ZADD', 'apex:shared:ix:owner:' .. ARGV[10], seq, ARGV[1])
end
redis.call('PUBLISH', ARGV[5], KEYS[2])
return {'1', ARGV[1], tostring(seq)}
