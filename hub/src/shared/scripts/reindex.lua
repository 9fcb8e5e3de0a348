-- reindex.lua: the prelude of every script that writes a task record (prepended to its text,
-- never run alone). Defines the Lua function apex_reindex, which keeps the listing indexes
-- (sorted sets under apex:shared:ix:, score = the task's seq in apex:shared:index, member =
-- task id) in the same atomic step as the record: it moves the task from the indexes of the
-- status, tool and node it had (task hash fields ix_s, ix_t, ix_n) to those of the new ones,
-- or out of all of them. Unchanged keys cost one HMGET. The owner index ix:owner:{o} (hash
-- field ix_o) is written once by the submit scripts (an owner never changes) and removed here
-- with the rest on deletion.
--
-- KEYS, ARGV: none (a function, called as apex_reindex(tk, id, s, t, n)):
--   tk  the task hash key (apex:shared:task:{id})
--   id  the task id
--   s   its status (false: remove the task from every index, for a deletion)
--   t   its tool
--   n   its node id ('' if none)
-- Keys it computes: apex:shared:index (read), ix:status:{s}, ix:tool:{t}, ix:st:{s}:{t},
-- ix:node:{n}, ix:sn:{s}:{n} (all under apex:shared:).
--
-- Returns nothing.

local function apex_reindex(tk, id, s, t, n)
  local old = redis.call('HMGET', tk, 'ix_s', 'ix_t', 'ix_n')
  local os, ot, on = old[1], old[2], old[3]
  if os == s and ot == t and on == n then return end
  local P = 'apex:shared:ix:'
  if not s then
    if os then
      redis.call('ZREM', P .. 'status:' .. os, id)
      redis.call('ZREM', P .. 'tool:' .. ot, id)
      redis.call('ZREM', P .. 'st:' .. os .. ':' .. ot, id)
      if on ~= '' then
        redis.call('ZREM', P .. 'node:' .. on, id)
        redis.call('ZREM', P .. 'sn:' .. os .. ':' .. on, id)
      end
      redis.call('HDEL', tk, 'ix_s', 'ix_t', 'ix_n')
    end
    local owner = redis.call('HGET', tk, 'ix_o')
    if owner then
      redis.call('ZREM', P .. 'owner:' .. owner, id)
      redis.call('HDEL', tk, 'ix_o')
    end
    return
  end
  local seq = redis.call('ZSCORE', 'apex:shared:index', id)
  if not seq then return end
  if not os then os, ot, on = '', '', '' end
  if os ~= s then
    if os ~= '' then redis.call('ZREM', P .. 'status:' .. os, id) end
    redis.call('ZADD', P .. 'status:' .. s, seq, id)
  end
  if ot ~= t then
    if ot ~= '' then redis.call('ZREM', P .. 'tool:' .. ot, id) end
    redis.call('ZADD', P .. 'tool:' .. t, seq, id)
  end
  if os ~= s or ot ~= t then
    if os ~= '' then redis.call('ZREM', P .. 'st:' .. os .. ':' .. ot, id) end
    redis.call('ZADD', P .. 'st:' .. s .. ':' .. t, seq, id)
  end
  if on ~= n then
    if on ~= '' then redis.call('ZREM', P .. 'node:' .. on, id) end
    if n ~= '' then redis.call('ZADD', P .. 'node:' .. n, seq, id) end
  end
  if os ~= s or on ~= n then
    if on ~= '' then redis.call('ZREM', P .. 'sn:' .. os .. ':' .. on, id) end
    if n ~= '' then redis.call('ZADD', P .. 'sn:' .. s .. ':' .. n, seq, id) end
  end
  redis.call('HSET', tk, 'ix_s', s, 'ix_t', t, 'ix_n', n)
end
