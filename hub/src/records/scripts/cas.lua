-- Compare-and-set of one record (see records/redis.rs).
-- KEYS[1]: the kind's hash `apex:rec:<kind>`; KEYS[2]: its version counter `apex:rec:<kind>:v`.
-- ARGV[1]: id; ARGV[2]: "1" to compare, "0" to write unconditionally; ARGV[3]: "1" if a live
-- value is expected; ARGV[4]: the expected data; ARGV[5]: "1" to write, "0" to delete;
-- ARGV[6]: the new envelope `<expiry ms or 0>|<data>`.
-- Reply: {wrote (0|1), previous envelope or false}. Expiry is judged on Redis's clock.
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local live = false
  local data = nil
  if prev then
    local sep = string.find(prev, '|', 1, true)
    local exp = tonumber(string.sub(prev, 1, sep - 1))
    if exp == 0 or exp > now then
      live = true
      data = string.sub(prev, sep + 1)
    end
  end
  if ARGV[3] == '1' then
    if not live or data ~= ARGV[4] then return {0, prev} end
  elseif live then
    return {0, prev}
  end
end
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[6])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('INCR', KEYS[2])
return {1, prev}
