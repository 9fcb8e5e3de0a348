-- claim_many.lua: claims tasks from several queues for this hub. Checks the lease, then per
-- queue in turn, until the total is reached, pops members (ZPOPMIN: highest priority, then
-- oldest) and claims those still queued: owner, epoch, claim + 1, state = claimed, added to
-- the owned set. The record is not changed.
--
-- KEYS[1] this hub's lease (hub:{id})
-- KEYS[2] its owned set (owned:{id})
-- KEYS[3..] the queues, in the order to serve them
-- ARGV[1] hub id
-- ARGV[2] epoch
-- ARGV[3] the task key prefix (apex:shared:task:)
-- ARGV[4] the most to take over all queues
-- ARGV[4+j] the most to take from queue KEYS[2+j] (j from 1)
--
-- Reply: the claimed tasks' record, claim pairs, flattened. Error 'LEASE the hub lease is lost'
-- if the lease does not hold the epoch (nothing claimed).

if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return redis.error_reply('LEASE the hub lease is lost')
end
local out = {}
local left = tonumber(ARGV[4])
for j = 3, #KEYS do
  if left <= 0 then break end
  local n = math.min(tonumber(ARGV[2 + j]), left)
  local got = 0
  while got < n do
    local p = redis.call('ZPOPMIN', KEYS[j])
    if #p == 0 then break end
    local id = string.sub(p[1], 22)
    local tk = ARGV[3] .. id
    if redis.call('HGET', tk, 'state') == 'queued' then
      local claim = redis.call('HINCRBY', tk, 'claim', 1)
      redis.call('HSET', tk, 'state', 'claimed', 'owner', ARGV[1], 'epoch', ARGV[2])
      redis.call('SADD', KEYS[2], id)
      table.insert(out, redis.call('HGET', tk, 'record'))
      table.insert(out, tostring(claim))
      got = got + 1
    end
  end
  left = left - got
end
return out
