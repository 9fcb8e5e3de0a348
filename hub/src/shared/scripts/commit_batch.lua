-- commit_batch.lua: writes the records of many tasks this hub holds, each fenced on its own as
-- commit.lua is (the lease is read once, atomically with the writes). A record already
-- released with exactly this text is a retried batch: nothing written, reported written. Each
-- queue a task is handed back to is published once on the wake channel; each written task id
-- on the events channel. Runs after the apex_reindex prelude (reindex.lua).
--
-- KEYS[1] this hub's lease (hub:{id})
-- KEYS[2] its owned set (owned:{id})
-- KEYS[3] the finished set
-- then per task i (from 0):
-- KEYS[4+2i] its task hash
-- KEYS[5+2i] its queue
-- ARGV[1] hub id
-- ARGV[2] epoch
-- ARGV[3] events channel
-- ARGV[4] wake channel
-- ARGV[5] now (ms, the finish time of a done task)
-- then per task i (from 0):
-- ARGV[6+8i] the claim it is held under
-- ARGV[7+8i] record
-- ARGV[8+8i] next state (claimed, done or queued)
-- ARGV[9+8i] queue score (-priority)
-- ARGV[10+8i] task id
-- ARGV[11+8i] the record's status (listing indexes)
-- ARGV[12+8i] its tool
-- ARGV[13+8i] its node ('' if none)
--
-- Reply: one entry per task: 1 (written, or released already with exactly this record), or
-- 'FENCED the hub lease is lost' / 'FENCED the task is not held by this claim' (nothing
-- written for that task).

local n = (#KEYS - 3) / 2
local lease = redis.call('GET', KEYS[1]) == ARGV[2]
local out = {}
local woken = {}
for i = 0, n - 1 do
  local tk, q = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local claim, rec, nxt = ARGV[6 + 8 * i], ARGV[7 + 8 * i], ARGV[8 + 8 * i]
  local score, id = ARGV[9 + 8 * i], ARGV[10 + 8 * i]
  local h = redis.call('HMGET', tk, 'state', 'record', 'owner', 'epoch', 'claim', 'member')
  if h[1] ~= 'claimed' and h[2] == rec then
    table.insert(out, 1)
  elseif not lease then
    table.insert(out, 'FENCED the hub lease is lost')
  elseif h[3] ~= ARGV[1] or h[4] ~= ARGV[2] or h[5] ~= claim or h[1] ~= 'claimed' then
    table.insert(out, 'FENCED the task is not held by this claim')
  else
    redis.call('HSET', tk, 'record', rec)
    apex_reindex(tk, id, ARGV[11 + 8 * i], ARGV[12 + 8 * i], ARGV[13 + 8 * i])
    if nxt ~= 'claimed' then
      redis.call('HSET', tk, 'state', nxt)
      redis.call('HDEL', tk, 'owner', 'epoch')
      redis.call('SREM', KEYS[2], id)
      if nxt == 'queued' then
        redis.call('ZADD', q, score, h[6])
        woken[q] = true
      else
        redis.call('ZADD', KEYS[3], ARGV[5], id)
      end
    end
    redis.call('PUBLISH', ARGV[3], id)
    table.insert(out, 1)
  end
end
for q, _ in pairs(woken) do redis.call('PUBLISH', ARGV[4], q) end
return out
