-- list.lua: one page of a listing index, newest or oldest first. ZRANGE ... REV needs
-- Redis 6.2.
--
-- KEYS[1] the sorted set (index or an ix:* listing index; score seq, member task id)
-- ARGV[1] first rank (0: the newest, or with `asc` the oldest)
-- ARGV[2] last rank
-- ARGV[3] the task key prefix (apex:shared:task:)
-- ARGV[4] `desc` (newest first) or `asc` (oldest first)
--
-- Reply: the set's size (as a string), then the records of the page (a task deleted meanwhile
-- is skipped).

local out = {tostring(redis.call('ZCARD', KEYS[1]))}
local ids
if ARGV[4] == 'asc' then
  ids = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2])
else
  ids = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'REV')
end
for _, id in ipairs(ids) do
  local r = redis.call('HGET', ARGV[3] .. id, 'record')
  if r then table.insert(out, r) end
end
return out
