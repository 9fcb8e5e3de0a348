-- take_over.lua: hands a dead hub's claim over to the hub one of its nodes reconnected to. The
-- caller read the task hash and checked that the record is assigned or running on that node;
-- this checks that the new hub's lease holds its epoch, that owner, epoch, claim, state =
-- claimed and the record are exactly what was read, and that the old owner's lease no longer
-- holds the claiming epoch. Then the new hub owns the task with its epoch and claim + 1, the
-- id moves from the old owned set to the new one, the record is unchanged (same node, same
-- attempt), and the id is published on the events channel.
--
-- KEYS[1] the task hash
-- KEYS[2] the old owner's lease (hub:{old})
-- KEYS[3] the old owner's owned set (owned:{old})
-- KEYS[4] the new hub's lease (hub:{new})
-- KEYS[5] the new hub's owned set (owned:{new})
-- ARGV[1] old owner (hub id)
-- ARGV[2] old epoch
-- ARGV[3] old claim
-- ARGV[4] the record as read
-- ARGV[5] new hub id
-- ARGV[6] its epoch
-- ARGV[7] task id
-- ARGV[8] events channel
--
-- Reply: the new claim number (a string); 'alive' if the old owner's lease still holds its
-- epoch (try again later); 'changed' if the task is no longer exactly that claim and record
-- (read it again). Error 'LEASE the hub lease is lost' if the new hub's own lease is lost.

if redis.call('GET', KEYS[4]) ~= ARGV[6] then
  return redis.error_reply('LEASE the hub lease is lost')
end
local h = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'claim', 'state', 'record')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= ARGV[3] or h[4] ~= 'claimed'
  or h[5] ~= ARGV[4] then
  return 'changed'
end
if redis.call('GET', KEYS[2]) == ARGV[2] then return 'alive' end
local claim = redis.call('HINCRBY', KEYS[1], 'claim', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[5], 'epoch', ARGV[6])
redis.call('SREM', KEYS[3], ARGV[7])
redis.call('SADD', KEYS[5], ARGV[7])
redis.call('PUBLISH', ARGV[8], ARGV[7])
return tostring(claim)
