-- gcra.lua: one rate-limit check of a request over one or more GCRA buckets, atomically, on
-- the clock of Redis (TIME), so every hub sharing this Redis sees one bucket per key. The same
-- algorithm as `limits::gcra` in Rust (see its module docs); keep the two identical.
--
-- A bucket key holds its theoretical arrival time (TAT, µs since the Unix epoch) and expires
-- when the bucket is full again (an absent key is a full bucket).
--
-- KEYS[1] the first bucket, `apex:rl:<class>:<principal>`; KEYS[2..] more buckets of the same
--         request (the LLM class: requests, then tokens)
-- ARGV[1] mode: `check` (take each bucket's cost only if every bucket admits it; otherwise
--         nothing changes) or `charge` (take each cost whatever is left: usage already spent)
-- ARGV[2] now in µs since the Unix epoch, or '' for the Redis clock (tests pass a clock; a key's
--         expiry still runs on Redis's clock, so with a given clock it is an hour longer and
--         cannot fire between two of the caller's instants: a stale key is a full bucket anyway)
-- ARGV[3 * i], ARGV[3 * i + 1], ARGV[3 * i + 2] for bucket i (1-based): its emission interval
--         (µs per unit), burst (units) and cost (units; 0 asks whether one unit is left and
--         takes nothing)
--
-- Reply: {admitted (1 or 0; always 1 for `charge`), now (µs), then for each bucket: remaining
-- units, µs until it is full again, µs until the same check would be admitted (0 if it is)}.
-- A bucket that admitted its cost in a refused check reports its state untouched (as a cost-0
-- check sees it); for `charge` every bucket reports what a cost-0 check sees after the charge.

local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local charge = ARGV[1] == 'charge'
local ttl_slack_ms = ARGV[2] ~= '' and 3600000 or 0
local n = #KEYS

-- The GCRA check of one bucket: admitted, TAT to store, remaining, reset after, retry after.
local function gcra(tat, emission, burst, cost)
  local base = math.max(tat, now)
  local limit = now + emission * burst
  local needed = base + emission * math.max(cost, 1)
  if needed <= limit then
    local new_tat = base + emission * cost
    return true, new_tat, math.floor((limit - new_tat) / emission), new_tat - now, 0
  end
  return false, tat, math.floor(math.max(limit - base, 0) / emission), base - now, needed - limit
end

local tats, params = {}, {}
for i = 1, n do
  tats[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local a = 3 * i
  params[i] = {tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])}
end

local admitted = true
local results = {}
for i = 1, n do
  local e, b, c = params[i][1], params[i][2], params[i][3]
  if charge then
    local new_tat = math.max(tats[i], now) + e * c
    local _, _, remaining, reset, retry = gcra(new_tat, e, b, 0)
    results[i] = {new_tat, remaining, reset, retry}
  else
    local ok, tat, remaining, reset, retry = gcra(tats[i], e, b, c)
    if not ok then admitted = false end
    results[i] = {tat, remaining, reset, retry, ok}
  end
end

local reply = {admitted and 1 or 0, now}
for i = 1, n do
  local r = results[i]
  if admitted then
    if r[1] > now and r[1] ~= tats[i] then
      redis.call('SET', KEYS[i], string.format('%.0f', r[1]), 'PX',
        math.ceil((r[1] - now) / 1000) + ttl_slack_ms)
    end
  elseif r[5] then
    -- Admitted by itself but not taken (another bucket refused): its state as it is.
    local _, _, remaining, reset, retry = gcra(tats[i], params[i][1], params[i][2], 0)
    r = {tats[i], remaining, reset, retry}
  end
  table.insert(reply, r[2])
  table.insert(reply, r[3])
  table.insert(reply, r[4])
end
return reply
