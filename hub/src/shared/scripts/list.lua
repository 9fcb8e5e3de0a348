-- list.lua: one page of a listing index, newest first. ZRANGE ... REV needs Redis 6.2.
--
-- KEYS[1] the sorted set (index or an ix:* listing index; score seq, member task id)
-- ARGV[1] first rank (0: newest)
-- ARGV[2] last rank
-- ARGV[3] the task key prefix (apex:shared:task:)
--
-- Reply: the set's size (as a string), then the records of the page (a task deleted meanwhile
-- is skipped).

local out = {tostring(redis.call('ZCARD', KEYS[1]))}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'REV')) do
  local r = redis.call('HGET', ARGV[3] .. id, 'record')
  if r then table.insert(out, r) end
end
return out
