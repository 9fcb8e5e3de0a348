-- submit_batch.lua: stores and queues a batch of new tasks, all or none. Every read that can
-- fail (a key of the wrong type, an existing task hash, an idempotency key's task without a
-- record) runs before the first write, so an error writes nothing. A task whose idempotency key
-- was used before (at any hub, or earlier in this batch) is not written. Publishes each queue
-- key once on the wake channel. Runs after the apex_reindex prelude (reindex.lua).
--
-- KEYS[1] the seq counter
-- KEYS[2] index, every task id by seq
-- KEYS[3] deadlines
-- then per task i (from 0):
-- KEYS[4+3i] its task hash
-- KEYS[5+3i] its queue
-- KEYS[6+3i] its idempotency key (any name when unused)
-- ARGV[1] wake channel
-- ARGV[2] the task key prefix (apex:shared:task:)
-- then per task i (from 0):
-- ARGV[3+9i] task id
-- ARGV[4+9i] record
-- ARGV[5+9i] queue score (-priority)
-- ARGV[6+9i] '1' if its idempotency key is used
-- ARGV[7+9i] deadline (ms)
-- ARGV[8+9i] the record's status (listing indexes)
-- ARGV[9+9i] its tool
-- ARGV[10+9i] its node ('' if none)
-- ARGV[11+9i] its owner ('' if none): listed in ix:owner:{owner}, kept in the hash as ix_o
--
-- Reply: per task, flattened, '1', id, seq (new) or '0', existing id, its record (key used
-- before). Errors (nothing written): WRONGTYPE ..., task key ... exists already, task ... of
-- key ... has no record.

local n = (#KEYS - 3) / 3
local function want(key, types)
  local t = redis.call('TYPE', key)['ok']
  for _, ok in ipairs(types) do if t == ok then return end end
  error('WRONGTYPE key ' .. key .. ' holds a ' .. t)
end
want(KEYS[1], {'none', 'string'})
want(KEYS[2], {'none', 'zset'})
want(KEYS[3], {'none', 'zset'})
local existing = {}
local records = {}
local queues = {}
for i = 0, n - 1 do
  local tk, q, ik = KEYS[4 + 3 * i], KEYS[5 + 3 * i], KEYS[6 + 3 * i]
  if redis.call('EXISTS', tk) == 1 then error('task key ' .. tk .. ' exists already') end
  if not queues[q] then want(q, {'none', 'zset'}); queues[q] = true end
  if ARGV[6 + 9 * i] == '1' and existing[ik] == nil then
    local id = redis.call('GET', ik)
    if id then
      existing[ik] = id
      records[id] = redis.call('HGET', ARGV[2] .. id, 'record')
      if not records[id] then error('task ' .. id .. ' of key ' .. ik .. ' has no record') end
    else
      existing[ik] = false
    end
  end
end
local out = {}
for i = 0, n - 1 do
  local tk, q, ik = KEYS[4 + 3 * i], KEYS[5 + 3 * i], KEYS[6 + 3 * i]
  local id, rec = ARGV[3 + 9 * i], ARGV[4 + 9 * i]
  local idem = ARGV[6 + 9 * i] == '1'
  if idem and existing[ik] then
    local old = existing[ik]
    -- its record: read before the first write, or this batch's
    table.insert(out, '0'); table.insert(out, old); table.insert(out, records[old])
  else
    if idem then
      redis.call('SET', ik, id)
      existing[ik] = id
      records[id] = rec
    end
    local seq = redis.call('INCR', KEYS[1])
    local member = string.format('%020d', seq) .. ':' .. id
    redis.call('HSET', tk, 'record', rec, 'state', 'queued', 'queue', q, 'member', member,
      'claim', '0')
    if idem then redis.call('HSET', tk, 'idem', ik) end
    redis.call('ZADD', q, ARGV[5 + 9 * i], member)
    redis.call('ZADD', KEYS[2], seq, id)
    redis.call('ZADD', KEYS[3], ARGV[7 + 9 * i], id)
    apex_reindex(tk, id, ARGV[8 + 9 * i], ARGV[9 + 9 * i], ARGV[10 + 9 * i])
    local owner = ARGV[11 + 9 * i]
    if owner ~= '' then
      redis.call('HSET', tk, 'ix_o', owner)
      redis.call('ZADD', 'apex:shared:ix:owner:' .. owner, seq, id)
    end
    table.insert(out, '1'); table.insert(out, id); table.insert(out, tostring(seq))
  end
end
for q, _ in pairs(queues) do redis.call('PUBLISH', ARGV[1], q) end
return out
