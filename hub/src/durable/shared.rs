//! Shared mode's Redis protocol (issue 3, phase 2, `hub_mode = "shared"`): several hubs on one
//! Redis. The data layer (keys, Lua scripts, fencing, hub leases, the reaper) and the store
//! writer's backend; the loops that use it are in `shared_mode.rs` (see ARCHITECTURE.md,
//! "Several hubs on one Redis", for what is built and what is not).
//!
//! Keys (all under `apex:shared:`):
//! - `task:{id}`: hash with `record` (the [`Task`] JSON, events included), `state` (`queued`,
//!   `claimed` or `done`), `queue` and `member` (where it waits), `claim` (a counter bumped by
//!   every claim), and while claimed `owner` (hub id) and `epoch` (the owner's lease epoch).
//! - `queue:{tool}` and `pinned:{node}`: sorted sets of waiting tasks. Score `-priority`
//!   (exact for every `i32`); member `{seq:020}:{task id}` with `seq` from the global counter
//!   `seq`, so equal priorities pop oldest first (Redis orders equal scores by member).
//! - `epoch`: counter; every [`SharedRedis::join`] takes the next value as the hub's epoch.
//! - `hub:{id}`: the hub's lease, value = its epoch, time-to-live `lease_ttl_ms`, renewed by
//!   [`SharedRedis::renew`]. Once it is gone the hub must stop committing: every commit script
//!   checks it, and a hub that finds it gone has to join again (new epoch, nothing it claimed
//!   before is its any more).
//! - `hubs`: set of hub ids that joined and may still own tasks; `owned:{id}`: task ids a hub
//!   has claimed and not finished.
//! - `idem:{key}`: idempotency key → task id (`SET NX` inside the submit script).
//! - `index`: sorted set of every task id by its `seq` (for listing, newest first);
//!   `finished`: finished task ids by finish time in ms (for retention); `deadlines`: task
//!   ids by deadline in ms (for timing out tasks no hub claimed).
//! - `nodes`: hash node id → [`SharedNode`] JSON (the cluster-wide node registry).
//! - Listing indexes, sorted sets of task ids scored by `seq` (like `index`), kept by every
//!   script that writes a record (`apex_reindex`, with the task hash fields `ix_s`, `ix_t`,
//!   `ix_n` naming the keys it is in): `ix:status:{status}`, `ix:tool:{tool}`,
//!   `ix:st:{status}:{tool}`, `ix:node:{node}`, `ix:sn:{status}:{node}` (node: the record's
//!   current or last `node_id`).
//!
//! Pub/sub: `apex:shared:wake` carries a queue key whenever a task is added to it;
//! `apex:shared:task-events` carries a task id whenever its record changed (readers re-read the
//! record and send the events after the last sequence number they saw); `apex:shared:cancel`
//! carries ids of tasks to cancel (the hub holding one cancels it); `apex:shared:node-actions`
//! carries drain/undrain requests for a node, naming the hub holding its connection.
//!
//! Fencing: [`SharedRedis::commit`] and [`SharedRedis::release`] write only if the hub's lease still holds its epoch and the
//! task's `owner`, `epoch` and `claim` are the ones it claimed. [`SharedRedis::reap`] requeues
//! a claimed task only if its owner's lease no longer holds the claiming epoch. Both are single
//! scripts, so a result from an expired lease is never committed and a task is never both
//! committed by its old owner and requeued. [`SharedRedis::take_over`] (a dead hub's claim to
//! the hub its node reconnected to) has the same two conditions as the requeue (claim
//! unchanged, old lease not holding its epoch), so the two exclude each other; the reaper
//! leaves such a task to that hub for the hand-over window ([`HANDOVER_WINDOW_LEASES`]).
//!
//! The scripts touch keys they compute from others (the task hashes a claim pops), which a
//! standalone Redis allows; Redis Cluster is not supported.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use futures::{Stream, StreamExt};

use apex_protocol::ErrorInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::model::{EventKind, Task, TaskEvent, TaskStatus};
use crate::store::NodeRecord;

/// Prefix of every shared-mode key.
pub const PREFIX: &str = "apex:shared:";
/// Pub/sub channel announcing a queue key that received a task.
pub const WAKE_CHANNEL: &str = "apex:shared:wake";
/// Pub/sub channel announcing a task id whose record changed.
pub const EVENTS_CHANNEL: &str = "apex:shared:task-events";
/// Default lifetime of a hub lease, in milliseconds (renewed every second).
pub const DEFAULT_LEASE_TTL_MS: u64 = 5_000;

/// The Lua function every script that writes a task record calls to keep the listing indexes
/// (`ix:*` sorted sets, score = the task's `seq` from `index`, member = task id):
/// `apex_reindex(task key, id, status, tool, node)` moves the task from the indexes of the
/// status, tool and node it had (hash fields `ix_s`, `ix_t`, `ix_n`) to those of the new ones
/// (`node` empty: none); `status` false removes it from all (deletion). Unchanged keys cost
/// one `HMGET`.
macro_rules! reindex_lua {
    () => {
        r"
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
"
    };
}

/// Submit: KEYS[1] task hash, KEYS[2] queue, KEYS[3] seq counter, KEYS[4] idempotency key,
/// KEYS[5] the index of every task by `seq`, KEYS[6] deadlines; ARGV[6] the deadline (ms);
/// ARGV[1] task id, ARGV[2] record, ARGV[3] score, ARGV[4] `1` if KEYS[4] is used, ARGV[5]
/// wake channel, ARGV[7..9] the task's status, tool and node for the listing indexes. Returns
/// `{"1", id, seq}` for a new task or `{"0", existing id, ""}`.
const SUBMIT: &str = concat!(
    reindex_lua!(),
    r"
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
redis.call('PUBLISH', ARGV[5], KEYS[2])
return {'1', ARGV[1], tostring(seq)}
"
);

/// Submit a batch, all or none: KEYS[1] seq counter, KEYS[2] index, KEYS[3] deadlines, then per
/// task i (from 0) KEYS[4+3i] task hash, KEYS[5+3i] queue, KEYS[6+3i] idempotency key (any
/// name when unused); ARGV[1] wake channel, ARGV[2] the task key prefix, then per task
/// ARGV[3+8i] id, ARGV[4+8i] record, ARGV[5+8i] score, ARGV[6+8i] `1` if its idempotency key
/// is used, ARGV[7+8i] deadline (ms), ARGV[8+8i..10+8i] its status, tool and node for the
/// listing indexes (`apex_reindex`). Every read that can fail (a key of the wrong type, an
/// existing task hash) runs before the first write, so an error writes nothing. Returns per
/// task `{"1", id, seq}` (new) or `{"0", existing id, its record}` (idempotency key used
/// before, at any hub or earlier in this batch), flattened. Publishes each queue once.
const SUBMIT_BATCH: &str = concat!(
    reindex_lua!(),
    r"
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
  if ARGV[6 + 8 * i] == '1' and existing[ik] == nil then
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
  local id, rec = ARGV[3 + 8 * i], ARGV[4 + 8 * i]
  local idem = ARGV[6 + 8 * i] == '1'
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
    redis.call('ZADD', q, ARGV[5 + 8 * i], member)
    redis.call('ZADD', KEYS[2], seq, id)
    redis.call('ZADD', KEYS[3], ARGV[7 + 8 * i], id)
    apex_reindex(tk, id, ARGV[8 + 8 * i], ARGV[9 + 8 * i], ARGV[10 + 8 * i])
    table.insert(out, '1'); table.insert(out, id); table.insert(out, tostring(seq))
  end
end
for q, _ in pairs(queues) do redis.call('PUBLISH', ARGV[1], q) end
return out
"
);

/// Commit a batch of held tasks, each fenced on its own (as [`COMMIT`]): KEYS[1] hub lease,
/// KEYS[2] owned set, KEYS[3] finished set, then per task i (from 0) KEYS[4+2i] task hash,
/// KEYS[5+2i] its queue; ARGV[1] hub id, ARGV[2] epoch, ARGV[3] events channel, ARGV[4] wake
/// channel, ARGV[5] now (ms), then per task ARGV[6+8i] claim, ARGV[7+8i] record, ARGV[8+8i]
/// next state (`claimed`, `done`, `queued`), ARGV[9+8i] score, ARGV[10+8i] task id,
/// ARGV[11+8i..13+8i] the record's status, tool and node for the listing indexes. Returns
/// one entry per task: 1 (written, or released already with exactly this record) or a string
/// starting `FENCED` (nothing written for that task). Each queue is published once.
const COMMIT_BATCH: &str = concat!(
    reindex_lua!(),
    r"
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
"
);

/// [`SUBMIT_BATCH`], hashed once.
static SUBMIT_BATCH_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SUBMIT_BATCH));
/// [`COMMIT_BATCH`], hashed once.
static COMMIT_BATCH_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(COMMIT_BATCH));

/// Claim from several queues in one call: KEYS[1] hub lease, KEYS[2] owned set, then the
/// queues KEYS[3..]; ARGV[1] hub id, ARGV[2] epoch, ARGV[3] task key prefix, ARGV[4] the most
/// to take over all queues, then ARGV[4+j] the most to take from queue KEYS[2+j]. Checks the
/// lease (error `LEASE ...` if it does not hold the epoch), then per queue in turn, until the
/// total is reached, pops members (`ZPOPMIN`: highest priority, then oldest) and claims those
/// still `queued` (owner, epoch, `claim` + 1, `state = claimed`, added to the owned set);
/// returns the record/claim pairs of all of them (flat).
const CLAIM_MANY: &str = r"
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
";

/// [`CLAIM_MANY`], hashed once.
static CLAIM_MANY_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CLAIM_MANY));

/// Commit: KEYS[1] task hash, KEYS[2] hub lease, KEYS[3] owned set, KEYS[4] the task's queue,
/// KEYS[5] the finished set; ARGV[1] hub id, ARGV[2] epoch, ARGV[3] claim, ARGV[4] record,
/// ARGV[5] next state (`claimed`, `done`, `queued`), ARGV[6] score, ARGV[7] task id, ARGV[8]
/// events channel, ARGV[9] wake channel, ARGV[10] now (ms, the finish time for `done`),
/// ARGV[11..13] the record's status, tool and node for the listing indexes. Returns 1 (also, writing nothing, when the task is released already
/// with exactly this record: a retried batch), or an error starting `FENCED`.
const COMMIT: &str = concat!(
    reindex_lua!(),
    r"
local done = redis.call('HMGET', KEYS[1], 'state', 'record')
if done[1] ~= 'claimed' and done[2] == ARGV[4] then return 1 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return redis.error_reply('FENCED the hub lease is lost')
end
local h = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'claim', 'state', 'member')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= ARGV[3] or h[4] ~= 'claimed' then
  return redis.error_reply('FENCED the task is not held by this claim')
end
redis.call('HSET', KEYS[1], 'record', ARGV[4])
apex_reindex(KEYS[1], ARGV[7], ARGV[11], ARGV[12], ARGV[13])
if ARGV[5] ~= 'claimed' then
  redis.call('HSET', KEYS[1], 'state', ARGV[5])
  redis.call('HDEL', KEYS[1], 'owner', 'epoch')
  redis.call('SREM', KEYS[3], ARGV[7])
  if ARGV[5] == 'queued' then
    redis.call('ZADD', KEYS[4], ARGV[6], h[5])
    redis.call('PUBLISH', ARGV[9], KEYS[4])
  else
    redis.call('ZADD', KEYS[5], ARGV[10], ARGV[7])
  end
end
redis.call('PUBLISH', ARGV[8], ARGV[7])
return 1
"
);

/// Finish a task that waits in a queue (cancel, timeout): KEYS[1] task hash, KEYS[2] queue,
/// KEYS[3] the finished set; ARGV[1] record, ARGV[2] task id, ARGV[3] events channel, ARGV[4]
/// now (ms), ARGV[5..7] the record's status, tool and node for the listing indexes. Returns 1,
/// or 0 if the task is not queued (claimed by a hub, or finished).
const FINISH_QUEUED: &str = concat!(
    reindex_lua!(),
    r"
local h = redis.call('HMGET', KEYS[1], 'state', 'member')
if h[1] ~= 'queued' then return 0 end
redis.call('ZREM', KEYS[2], h[2])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'state', 'done')
apex_reindex(KEYS[1], ARGV[2], ARGV[5], ARGV[6], ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"
);

/// Renew: KEYS[1] hub lease; ARGV[1] epoch, ARGV[2] ttl ms. Returns 1 if renewed, 0 if the
/// lease is gone or holds another epoch.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Requeue a task of a dead hub: KEYS[1] task hash, KEYS[2] its owner's lease, KEYS[3] its
/// owner's owned set, KEYS[4] its queue, KEYS[5] the finished set; ARGV[1] owner, ARGV[2]
/// epoch, ARGV[3] claim, ARGV[4] record, ARGV[5] next state (`queued` or `done`), ARGV[6]
/// score, ARGV[7] task id, ARGV[8] events channel, ARGV[9] wake channel, ARGV[10] now (ms),
/// ARGV[11..13] the record's status, tool and node for the listing indexes. Returns 1, or 0 if
/// the claim is alive or gone.
const REQUEUE: &str = concat!(
    reindex_lua!(),
    r"
if redis.call('GET', KEYS[2]) == ARGV[2] then return 0 end
local h = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'claim', 'state', 'member')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= ARGV[3] or h[4] ~= 'claimed' then
  return 0
end
redis.call('HSET', KEYS[1], 'record', ARGV[4], 'state', ARGV[5])
apex_reindex(KEYS[1], ARGV[7], ARGV[11], ARGV[12], ARGV[13])
redis.call('HDEL', KEYS[1], 'owner', 'epoch')
redis.call('SREM', KEYS[3], ARGV[7])
if ARGV[5] == 'queued' then
  redis.call('ZADD', KEYS[4], ARGV[6], h[5])
  redis.call('PUBLISH', ARGV[9], KEYS[4])
else
  redis.call('ZADD', KEYS[5], ARGV[10], ARGV[7])
end
redis.call('PUBLISH', ARGV[8], ARGV[7])
return 1
"
);

/// Retention: KEYS[1] the finished set, KEYS[2] the index, KEYS[3] deadlines; ARGV[1] cutoff (ms), ARGV[2] at
/// most this many, ARGV[3] task key prefix. Deletes tasks finished before the cutoff (hash,
/// idempotency key, index entries, listing indexes). Returns how many.
const COLLECT: &str = concat!(
    reindex_lua!(),
    r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  local tk = ARGV[3] .. id
  local idem = redis.call('HGET', tk, 'idem')
  if idem then redis.call('DEL', idem) end
  apex_reindex(tk, id, false, false, false)
  redis.call('DEL', tk)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[3], id)
end
return #ids
"
);

/// A page of a listing index: KEYS[1] the sorted set (score `seq`, member task id); ARGV[1]
/// first and ARGV[2] last rank (newest first), ARGV[3] task key prefix. Returns the set's size
/// then the records of that page (a task deleted meanwhile is skipped). `ZRANGE ... REV` needs
/// Redis 6.2.
const LIST: &str = r"
local out = {tostring(redis.call('ZCARD', KEYS[1]))}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'REV')) do
  local r = redis.call('HGET', ARGV[3] .. id, 'record')
  if r then table.insert(out, r) end
end
return out
";

/// Leave: KEYS[1] hub lease; ARGV[1] epoch. Deletes the lease if it still holds this epoch.
/// Returns 1 if deleted.
const LEAVE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
";

/// Forget a dead hub with nothing left: KEYS[1] hubs set, KEYS[2] its lease, KEYS[3] its owned
/// set; ARGV[1] hub id. Returns 1 if this call removed it.
const FORGET_HUB: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('SCARD', KEYS[3]) > 0 then return 0 end
return redis.call('SREM', KEYS[1], ARGV[1])
";

/// Hand a dead hub's claim over to the hub a node of it reconnected to: KEYS[1] task hash,
/// KEYS[2] the old owner's lease, KEYS[3] its owned set, KEYS[4] the new hub's lease, KEYS[5]
/// its owned set; ARGV[1] old owner, ARGV[2] old epoch, ARGV[3] old claim, ARGV[4] the record
/// as read (the caller checked it is assigned to the reconnected node), ARGV[5] new hub id,
/// ARGV[6] its epoch, ARGV[7] task id, ARGV[8] events channel. Returns the new claim number,
/// `alive` (the old owner's lease still holds its epoch: try again later) or `changed` (the
/// task is no longer exactly that claim and record: read it again); an error starting `LEASE`
/// if the new hub's own lease is lost.
const TAKE_OVER: &str = r"
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
";

/// How long after a node re-registers at a live hub the reapers leave the tasks a dead hub
/// assigned to it alone (that hub takes them over, see [`SharedRedis::take_over`]), as a
/// multiple of the lease lifetime: the old owner's lease must expire first (one lifetime), then
/// the new hub's hand-over pass must run.
pub const HANDOVER_WINDOW_LEASES: u64 = 3;

/// What [`SharedRedis::take_over`] did.
#[derive(Debug, Clone)]
pub enum TakeOver {
    /// This hub holds the task now, under a new claim (same record: still assigned to the
    /// node, same attempt).
    Taken(Box<Claimed>),
    /// The old owner's lease still holds the claiming epoch: ask again later.
    Wait,
    /// Not taken and never will be: the reason (the task finished, was requeued, is held by
    /// a live hub, is assigned elsewhere, or does not exist).
    Refused(&'static str),
}

/// Why a shared-mode call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedError {
    /// Redis cannot be reached or answered an error (HTTP: 503).
    #[error("shared store {what} is unavailable: {reason}")]
    Unavailable {
        /// The Redis URL without password.
        what: String,
        /// The cause, one line.
        reason: String,
    },
    /// The hub's lease or the task's claim is no longer this hub's: nothing was written.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A stored record does not decode.
    #[error("shared store record of task {id} does not decode: {reason}")]
    Unreadable {
        /// Task id.
        id: String,
        /// Decoder message.
        reason: String,
    },
}

/// Where a task waits: its tool's queue, or its pinned node's.
pub fn queue_key(task: &Task) -> String {
    match &task.spec.pinned_node {
        Some(node) => format!("{PREFIX}pinned:{node}"),
        None => format!("{PREFIX}queue:{}", task.spec.tool),
    }
}

/// The queue key of a tool.
pub fn tool_queue(tool: &str) -> String {
    format!("{PREFIX}queue:{tool}")
}

/// The queue key of tasks pinned to a node.
pub fn pinned_queue(node: &str) -> String {
    format!("{PREFIX}pinned:{node}")
}

fn task_key(id: &str) -> String {
    format!("{PREFIX}task:{id}")
}

fn lease_key(hub: &str) -> String {
    format!("{PREFIX}hub:{hub}")
}

fn owned_key(hub: &str) -> String {
    format!("{PREFIX}owned:{hub}")
}

/// Queue score: lower pops first, so higher priority gets a lower score. Exact for any `i32`.
fn score(task: &Task) -> f64 {
    -f64::from(task.spec.priority)
}

/// The reply of the claim scripts (record, claim number; flat) as [`Claimed`] tasks.
///
/// # Errors
/// [`SharedError::Unreadable`] if a record does not decode.
fn parse_claimed(flat: &[Vec<u8>]) -> Result<Vec<Claimed>, SharedError> {
    let mut out = Vec::with_capacity(flat.len() / 2);
    for pair in flat.chunks(2) {
        let [record, claim] = pair else { break };
        let task: Task = serde_json::from_slice(record).map_err(|e| SharedError::Unreadable {
            id: "(claimed)".to_owned(),
            reason: e.to_string(),
        })?;
        let claim = std::str::from_utf8(claim)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        out.push(Claimed { task, claim });
    }
    Ok(out)
}

/// A record's keys in the listing indexes, as script arguments: status, tool, node (empty if
/// none).
fn index_fields(task: &Task) -> Vec<String> {
    vec![
        task.status.as_str().to_owned(),
        task.spec.tool.clone(),
        task.node_id.clone().unwrap_or_default(),
    ]
}

/// Result of [`SharedRedis::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The task was stored and queued; `seq` is its global acceptance order.
    New {
        /// Global acceptance sequence number.
        seq: u64,
    },
    /// The idempotency key names an existing task (possibly submitted at another hub).
    Existing(String),
}

/// Result of one task of [`SharedRedis::submit_batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum SubmittedTask {
    /// The task was stored and queued; `seq` is its global acceptance order.
    New {
        /// Global acceptance sequence number.
        seq: u64,
    },
    /// The idempotency key names an existing task (submitted before at any hub, or earlier in
    /// the same batch): its record as stored.
    Existing(Box<Task>),
}

/// The shared state a fenced write leaves a task in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextState {
    /// Still held by this hub (assigned, running, or waiting in its engine).
    Claimed,
    /// Finished: released, added to the finished set.
    Done,
    /// Handed back to its shared queue for any hub.
    Queued,
}

impl NextState {
    fn as_str(self) -> &'static str {
        match self {
            NextState::Claimed => "claimed",
            NextState::Done => "done",
            NextState::Queued => "queued",
        }
    }
}

/// One fenced write of [`SharedRedis::commit_batch`].
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    /// Task id.
    pub id: &'a str,
    /// The claim this hub holds the task under ([`Claimed::claim`]).
    pub claim: u64,
    /// The task's record: its [`Task`] JSON, as `serde_json::to_vec` writes it.
    pub record: &'a [u8],
    /// The shared state after the write.
    pub next: NextState,
    /// The task's queue ([`queue_key`]), where [`NextState::Queued`] puts it back.
    pub queue: String,
    /// Its queue score (`-priority`).
    pub score: f64,
    /// The record's status, tool and node (empty if none): its keys in the listing indexes
    /// ([`index_fields`]).
    pub index: Vec<String>,
}

impl<'a> Commit<'a> {
    /// The commit of `record` (the JSON of `task`) for `task` held under `claim`: `done` if
    /// the task is terminal, else `claimed`.
    pub fn of(task: &'a Task, record: &'a [u8], claim: u64) -> Self {
        Commit {
            id: &task.id,
            claim,
            record,
            next: if task.status.is_terminal() {
                NextState::Done
            } else {
                NextState::Claimed
            },
            queue: queue_key(task),
            score: score(task),
            index: index_fields(task),
        }
    }
}

/// A task this hub claimed: its record and the claim number every commit must present.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The record as stored at claim time.
    pub task: Task,
    /// The task's claim counter after this claim (fencing token together with the epoch).
    pub claim: u64,
}

/// A node in the cluster-wide registry: the node's record and the hub it is connected to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedNode {
    /// The node.
    pub node: NodeRecord,
    /// The hub id holding its connection.
    pub hub: String,
    /// When that hub last wrote this entry, milliseconds since the Unix epoch.
    pub seen_ms: u64,
}

/// `HMGET record owner epoch claim state` of a task hash.
type ClaimFields = (
    Option<Vec<u8>>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// What the reaper did in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Tasks put back in their queue (attempts left).
    pub requeued: u64,
    /// Tasks failed with `node_lost` (no attempts left).
    pub failed: u64,
    /// Dead hubs forgotten (nothing left to reap).
    pub hubs_forgotten: u64,
    /// Tasks left alone because their node re-registered at a live hub, which takes them over
    /// ([`SharedRedis::take_over`]).
    pub handing_over: u64,
}

/// Pub/sub channel carrying ids of tasks to cancel: the hub holding the task cancels it.
pub const CANCEL_CHANNEL: &str = "apex:shared:cancel";

/// Subscribes to [`CANCEL_CHANNEL`] on a connection of its own; the stream yields task ids and
/// ends when the connection drops (subscribe again).
///
/// # Errors
/// [`SharedError::Unavailable`] if Redis cannot be reached.
pub async fn subscribe_cancels(
    url: &str,
) -> Result<impl Stream<Item = String> + Send + 'static, SharedError> {
    Ok(subscribe_channel(url, CANCEL_CHANNEL)
        .await?
        .filter_map(|payload| async move { String::from_utf8(payload).ok() }))
}

/// The payloads published on `channel`, on a pub/sub connection of its own; the stream ends
/// when the connection drops.
///
/// # Errors
/// [`SharedError::Unavailable`] if Redis cannot be reached.
async fn subscribe_channel(
    url: &str,
    channel: &'static str,
) -> Result<impl Stream<Item = Vec<u8>> + Send + 'static, SharedError> {
    let what = super::redis::redacted(url);
    let unavailable = |e: redis::RedisError| SharedError::Unavailable {
        what: what.clone(),
        reason: one_line(e),
    };
    let client = redis::Client::open(url).map_err(unavailable)?;
    let mut pubsub = client.get_async_pubsub().await.map_err(unavailable)?;
    pubsub.subscribe(channel).await.map_err(unavailable)?;
    Ok(pubsub
        .into_on_message()
        .map(|msg| msg.get_payload_bytes().to_vec()))
}

/// Pub/sub channel carrying operator actions on a node connected to another hub
/// ([`NodeAction`] JSON); the hub named in it applies them.
pub const NODE_ACTIONS_CHANNEL: &str = "apex:shared:node-actions";

/// An operator action on a node, forwarded to the hub holding its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAction {
    /// The hub that should apply it.
    pub hub: String,
    /// The node.
    pub node: String,
    /// `true`: drain (no new work); `false`: undrain.
    pub drain: bool,
}

/// Subscribes to [`NODE_ACTIONS_CHANNEL`] on a connection of its own; the stream yields the
/// actions that decode and ends when the connection drops (subscribe again).
///
/// # Errors
/// [`SharedError::Unavailable`] if Redis cannot be reached.
pub async fn subscribe_node_actions(
    url: &str,
) -> Result<impl Stream<Item = NodeAction> + Send + 'static, SharedError> {
    Ok(subscribe_channel(url, NODE_ACTIONS_CHANNEL)
        .await?
        .filter_map(|payload| async move { serde_json::from_slice(&payload).ok() }))
}

/// A wake-up published by some hub (see the module docs for the channels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A task was added to this queue key ([`tool_queue`] or [`pinned_queue`]).
    Queue(String),
    /// This task's record changed (read it with [`SharedRedis::get`]).
    Task(String),
}

/// Subscribes to [`WAKE_CHANNEL`] and [`EVENTS_CHANNEL`] on a connection of its own. The stream
/// ends when that connection drops: messages published meanwhile are lost, so a subscriber
/// subscribes again and re-reads what it follows (queues and task records are the truth; the
/// messages only say when to look).
///
/// # Errors
/// [`SharedError::Unavailable`] if Redis cannot be reached.
pub async fn subscribe(
    url: &str,
) -> Result<impl Stream<Item = Wake> + Send + 'static, SharedError> {
    let what = super::redis::redacted(url);
    let unavailable = |e: redis::RedisError| SharedError::Unavailable {
        what: what.clone(),
        reason: one_line(e),
    };
    let client = redis::Client::open(url).map_err(unavailable)?;
    let mut pubsub = client.get_async_pubsub().await.map_err(unavailable)?;
    pubsub
        .subscribe(&[WAKE_CHANNEL, EVENTS_CHANNEL])
        .await
        .map_err(unavailable)?;
    Ok(pubsub.into_on_message().filter_map(|msg| async move {
        let payload = String::from_utf8(msg.get_payload_bytes().to_vec()).ok()?;
        match msg.get_channel_name() {
            WAKE_CHANNEL => Some(Wake::Queue(payload)),
            EVENTS_CHANNEL => Some(Wake::Task(payload)),
            _ => None,
        }
    }))
}

/// A hub's id, shared epoch and lease lifetime: see [`SharedRedis::identity`].
#[derive(Debug, Clone)]
pub struct HubIdentity {
    hub_id: String,
    epoch: Arc<AtomicU64>,
    lease_ttl_ms: u64,
}

/// One hub's handle on the shared Redis.
pub struct SharedRedis {
    conn: ConnectionManager,
    what: String,
    hub_id: String,
    epoch: Arc<AtomicU64>,
    lease_ttl_ms: u64,
    /// Task ids whose shared record changed, fanned out from the hub's one subscription
    /// ([`SharedRedis::wake_task`]) to readers following a task ([`SharedRedis::task_wakes`]).
    task_wakes: tokio::sync::broadcast::Sender<Arc<str>>,
}

/// The task id [`SharedRedis::wake_task`] sends when every follower should read again (the
/// subscription was made again: messages may have been missed meanwhile).
pub const WAKE_ALL: &str = "*";

fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn now_ms() -> u64 {
    u64::try_from(apex_protocol::now_ms()).unwrap_or(0)
}

impl SharedRedis {
    /// Connects to `url` and joins as `hub_id`: takes the next epoch, sets the hub's lease
    /// (`lease_ttl_ms`) and registers the hub in `apex:shared:hubs`.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`] if Redis cannot be reached.
    pub async fn join(url: &str, hub_id: &str, lease_ttl_ms: u64) -> Result<Self, SharedError> {
        let s = Self::connect(url, hub_id, Arc::new(AtomicU64::new(0)), lease_ttl_ms).await?;
        s.rejoin().await?;
        Ok(s)
    }

    /// What another connection needs to act as this hub: its id, its epoch (shared, so a
    /// [`SharedRedis::rejoin`] on any handle applies to all) and its lease lifetime.
    pub fn identity(&self) -> HubIdentity {
        HubIdentity {
            hub_id: self.hub_id.clone(),
            epoch: self.epoch.clone(),
            lease_ttl_ms: self.lease_ttl_ms,
        }
    }

    /// Another handle for the hub `who` on the current runtime (a `ConnectionManager` is driven
    /// by the runtime that made it). Does not join again.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`] if Redis cannot be reached.
    pub async fn attach(url: &str, who: &HubIdentity) -> Result<Self, SharedError> {
        Self::connect(url, &who.hub_id, who.epoch.clone(), who.lease_ttl_ms).await
    }

    async fn connect(
        url: &str,
        hub_id: &str,
        epoch: Arc<AtomicU64>,
        lease_ttl_ms: u64,
    ) -> Result<Self, SharedError> {
        let what = super::redis::redacted(url);
        let unavailable = |e: String| SharedError::Unavailable {
            what: what.clone(),
            reason: e,
        };
        let client = redis::Client::open(url).map_err(|e| unavailable(one_line(e)))?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(std::time::Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(|e| unavailable(one_line(e)))?;
        Ok(Self {
            conn,
            what: what.clone(),
            hub_id: hub_id.to_owned(),
            epoch,
            lease_ttl_ms,
            task_wakes: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// Wake-ups of readers following task records (SSE and `wait_ms` at a hub that does not
    /// hold the task): each item is a task id whose record changed, or [`WAKE_ALL`]. A lagging
    /// receiver should read again. Subscribe before reading the record, so no change is missed.
    pub fn task_wakes(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.task_wakes.subscribe()
    }

    /// Passes on a [`Wake::Task`] (or [`WAKE_ALL`]) heard by the hub's subscription to the
    /// readers of [`SharedRedis::task_wakes`].
    pub fn wake_task(&self, id: &str) {
        if self.task_wakes.receiver_count() > 0 {
            let _ = self.task_wakes.send(Arc::from(id));
        }
    }

    /// Waits until `rx` (from [`SharedRedis::task_wakes`]) names task `id` or [`WAKE_ALL`], or
    /// lagged (some wake-up may be lost: read again). Never returns if the sender is gone.
    pub async fn task_woken(rx: &mut tokio::sync::broadcast::Receiver<Arc<str>>, id: &str) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match rx.recv().await {
                Ok(x) if &*x == id || &*x == WAKE_ALL => return,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => return,
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }

    /// Takes a new epoch and lease (after [`SharedRedis::renew`] reported the lease lost).
    /// Claims taken under the old epoch stay fenced; the reaper of some hub requeues them.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn rejoin(&self) -> Result<u64, SharedError> {
        let mut c = self.conn.clone();
        let epoch: u64 = redis::cmd("INCR")
            .arg(format!("{PREFIX}epoch"))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(lease_key(&self.hub_id))
            .arg(epoch)
            .arg("PX")
            .arg(self.lease_ttl_ms)
            .ignore()
            .cmd("SADD")
            .arg(format!("{PREFIX}hubs"))
            .arg(&self.hub_id)
            .ignore()
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(epoch)
    }

    /// This hub's id.
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// The lifetime of this hub's lease, in milliseconds.
    pub fn lease_ttl_ms(&self) -> u64 {
        self.lease_ttl_ms
    }

    /// How long a hub waits to take over a re-registered node's tasks, and the reapers leave
    /// them to it: [`HANDOVER_WINDOW_LEASES`] lease lifetimes.
    pub fn handover_window(&self) -> std::time::Duration {
        std::time::Duration::from_millis(HANDOVER_WINDOW_LEASES.saturating_mul(self.lease_ttl_ms))
    }

    /// This hub's current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> SharedError {
        SharedError::Unavailable {
            what: self.what.clone(),
            reason: one_line(e),
        }
    }

    fn classify(&self, e: redis::RedisError) -> SharedError {
        let text = one_line(&e);
        if text.contains("FENCED") || text.contains("LEASE") {
            SharedError::Fenced(text)
        } else {
            self.unavailable(text)
        }
    }

    /// Renews the hub's lease. `Ok(false)`: the lease is gone (expired, or the hub id joined
    /// elsewhere); the hub must stop committing and [`SharedRedis::rejoin`].
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn renew(&self) -> Result<bool, SharedError> {
        let mut c = self.conn.clone();
        let r: i64 = redis::Script::new(RENEW)
            .key(lease_key(&self.hub_id))
            .arg(self.epoch())
            .arg(self.lease_ttl_ms)
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(r == 1)
    }

    /// Deletes this hub's lease if it still holds its epoch (graceful shutdown): from then on
    /// nothing this hub holds can be committed by it, and every hub's reaper requeues its tasks
    /// at its next pass instead of after the lease would have expired. `Ok(false)` if the
    /// lease was gone already.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn leave(&self) -> Result<bool, SharedError> {
        let mut c = self.conn.clone();
        let r: i64 = redis::Script::new(LEAVE)
            .key(lease_key(&self.hub_id))
            .arg(self.epoch())
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(r == 1)
    }

    /// Whether the hub's lease still holds its epoch (reads only; does not renew).
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn lease_alive(&self) -> Result<bool, SharedError> {
        let mut c = self.conn.clone();
        let cur: Option<u64> = redis::cmd("GET")
            .arg(lease_key(&self.hub_id))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(cur == Some(self.epoch()))
    }

    /// Stores a new task (status `queued`) and queues it in [`queue_key`]; with an idempotency
    /// key already used (at any hub) nothing is written and the existing id is returned.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn submit(&self, task: &Task) -> Result<Submitted, SharedError> {
        let record = serde_json::to_vec(task).map_err(|e| self.unavailable(e))?;
        let idem = task.spec.idempotency_key.as_deref();
        let mut c = self.conn.clone();
        let r: Vec<String> = redis::Script::new(SUBMIT)
            .key(task_key(&task.id))
            .key(queue_key(task))
            .key(format!("{PREFIX}seq"))
            .key(format!("{PREFIX}idem:{}", idem.unwrap_or("")))
            .key(format!("{PREFIX}index"))
            .key(format!("{PREFIX}deadlines"))
            .arg(&task.id)
            .arg(record)
            .arg(score(task))
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(WAKE_CHANNEL)
            .arg(deadline_ms(task))
            .arg(index_fields(task))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        match r.as_slice() {
            [flag, _, seq] if flag == "1" => Ok(Submitted::New {
                seq: seq.parse().unwrap_or(0),
            }),
            [_, id, _] => Ok(Submitted::Existing(id.clone())),
            _ => Err(self.unavailable("unexpected reply of the submit script")),
        }
    }

    /// Claims up to `n` queued tasks of `queue` (a [`tool_queue`] or [`pinned_queue`]) for this
    /// hub, highest priority then oldest first. Claimed tasks keep their stored status
    /// (`queued`) until the hub commits the assignment.
    ///
    /// # Errors
    /// [`SharedError::Fenced`] if the hub's lease is lost (nothing claimed);
    /// [`SharedError::Unavailable`]; [`SharedError::Unreadable`] for a bad record.
    pub async fn claim(&self, queue: &str, n: usize) -> Result<Vec<Claimed>, SharedError> {
        self.claim_many(&[(queue.to_owned(), n)], n).await
    }

    /// [`SharedRedis::claim`] from several queues in one script call: up to `n` tasks of each
    /// `(queue, n)`, in that order (queues with `n = 0` are skipped), and at most `total` in
    /// all.
    ///
    /// # Errors
    /// As [`SharedRedis::claim`].
    pub async fn claim_many(
        &self,
        queues: &[(String, usize)],
        total: usize,
    ) -> Result<Vec<Claimed>, SharedError> {
        let queues: Vec<&(String, usize)> = queues.iter().filter(|(_, n)| *n > 0).collect();
        if queues.is_empty() || total == 0 {
            return Ok(Vec::new());
        }
        let mut script = CLAIM_MANY_SCRIPT.prepare_invoke();
        script
            .key(lease_key(&self.hub_id))
            .key(owned_key(&self.hub_id))
            .arg(&self.hub_id)
            .arg(self.epoch())
            .arg(format!("{PREFIX}task:"))
            .arg(total);
        for (queue, n) in &queues {
            script.key(queue).arg(*n);
        }
        let mut c = self.conn.clone();
        let flat: Vec<Vec<u8>> = script
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.classify(e))?;
        parse_claimed(&flat)
    }

    /// Writes the record of a task this hub claimed (`claim` from [`Claimed`]). A terminal
    /// status releases the task (`done`); anything else keeps the claim (a `queued` record is a
    /// task waiting in this hub's engine).
    ///
    /// # Errors
    /// [`SharedError::Fenced`] if the hub's lease or the task's claim is no longer this hub's
    /// (nothing written); [`SharedError::Unavailable`].
    pub async fn commit(&self, task: &Task, claim: u64) -> Result<(), SharedError> {
        let next = if task.status.is_terminal() {
            "done"
        } else {
            "claimed"
        };
        self.fenced_write(task, claim, next).await
    }

    /// Hands a claimed, unfinished task back to its shared queue (for any hub), writing `task`
    /// (whose status should be `queued`) as its record.
    ///
    /// # Errors
    /// As [`SharedRedis::commit`].
    pub async fn release(&self, task: &Task, claim: u64) -> Result<(), SharedError> {
        self.fenced_write(task, claim, "queued").await
    }

    async fn fenced_write(&self, task: &Task, claim: u64, next: &str) -> Result<(), SharedError> {
        let record = serde_json::to_vec(task).map_err(|e| self.unavailable(e))?;
        let mut c = self.conn.clone();
        let _: i64 = redis::Script::new(COMMIT)
            .key(task_key(&task.id))
            .key(lease_key(&self.hub_id))
            .key(owned_key(&self.hub_id))
            .key(queue_key(task))
            .key(format!("{PREFIX}finished"))
            .arg(&self.hub_id)
            .arg(self.epoch())
            .arg(claim)
            .arg(record)
            .arg(next)
            .arg(score(task))
            .arg(&task.id)
            .arg(EVENTS_CHANNEL)
            .arg(WAKE_CHANNEL)
            .arg(now_ms())
            .arg(index_fields(task))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// Stores and queues a batch of new tasks (status `queued`) in one script, all or none:
    /// nothing is written unless every task can be (a Redis error, or a key of the wrong type,
    /// writes nothing). A task whose idempotency key was used before (at any hub, or by an
    /// earlier task of this batch) is not written; its entry names the existing task. One
    /// entry per task, in order; each queue is announced once on [`WAKE_CHANNEL`].
    ///
    /// # Errors
    /// [`SharedError::Unavailable`] (nothing written); [`SharedError::Unreadable`] if the
    /// existing task of an idempotency key does not decode.
    pub async fn submit_batch(&self, tasks: &[Task]) -> Result<Vec<SubmittedTask>, SharedError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut script = SUBMIT_BATCH_SCRIPT.prepare_invoke();
        script
            .key(format!("{PREFIX}seq"))
            .key(format!("{PREFIX}index"))
            .key(format!("{PREFIX}deadlines"))
            .arg(WAKE_CHANNEL)
            .arg(format!("{PREFIX}task:"));
        for task in tasks {
            let record = serde_json::to_vec(task).map_err(|e| self.unavailable(e))?;
            let idem = task.spec.idempotency_key.as_deref();
            script
                .key(task_key(&task.id))
                .key(queue_key(task))
                .key(format!("{PREFIX}idem:{}", idem.unwrap_or("")))
                .arg(&task.id)
                .arg(record)
                .arg(score(task))
                .arg(if idem.is_some() { "1" } else { "0" })
                .arg(deadline_ms(task))
                .arg(index_fields(task));
        }
        let mut c = self.conn.clone();
        let flat: Vec<Vec<u8>> = script
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        if flat.len() != 3 * tasks.len() {
            return Err(self.unavailable("unexpected reply of the batch submit script"));
        }
        flat.chunks(3)
            .map(|row| match row {
                [flag, _, seq] if flag.as_slice() == b"1" => Ok(SubmittedTask::New {
                    seq: std::str::from_utf8(seq)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                }),
                [_, id, record] => serde_json::from_slice(record)
                    .map(|t| SubmittedTask::Existing(Box::new(t)))
                    .map_err(|e| SharedError::Unreadable {
                        id: String::from_utf8_lossy(id).into_owned(),
                        reason: e.to_string(),
                    }),
                _ => Err(self.unavailable("unexpected reply of the batch submit script")),
            })
            .collect()
    }

    /// Writes many records of tasks this hub holds in one script, each fenced on its own as
    /// [`SharedRedis::commit`] / [`SharedRedis::release`] do. Returns one entry per commit, in
    /// order: `Ok(())` (written, or released already with exactly this record) or
    /// `Err(reason)` if that task's write was fenced (nothing written for it).
    ///
    /// # Errors
    /// [`SharedError::Unavailable`] if the script did not run or failed part-way (commits are
    /// idempotent: retry the whole batch).
    pub async fn commit_batch(
        &self,
        commits: &[Commit<'_>],
    ) -> Result<Vec<Result<(), String>>, SharedError> {
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        let mut script = COMMIT_BATCH_SCRIPT.prepare_invoke();
        script
            .key(lease_key(&self.hub_id))
            .key(owned_key(&self.hub_id))
            .key(format!("{PREFIX}finished"))
            .arg(&self.hub_id)
            .arg(self.epoch())
            .arg(EVENTS_CHANNEL)
            .arg(WAKE_CHANNEL)
            .arg(now_ms());
        for c in commits {
            script
                .key(task_key(c.id))
                .key(&c.queue)
                .arg(c.claim)
                .arg(c.record)
                .arg(c.next.as_str())
                .arg(c.score)
                .arg(c.id)
                .arg(&c.index);
        }
        let mut c = self.conn.clone();
        let rows: Vec<redis::Value> = script
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        if rows.len() != commits.len() {
            return Err(self.unavailable("unexpected reply of the batch commit script"));
        }
        Ok(rows
            .into_iter()
            .map(|v| match v {
                redis::Value::Int(1) => Ok(()),
                redis::Value::BulkString(b) => Err(String::from_utf8_lossy(&b).into_owned()),
                redis::Value::SimpleString(s) => Err(s),
                other => Err(format!("FENCED unexpected reply {other:?}")),
            })
            .collect())
    }

    /// Finishes a task that still waits in its queue (no hub claimed it) with `task`'s
    /// terminal record. `Ok(false)` if it is claimed or already finished (nothing written).
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn finish_queued(&self, task: &Task) -> Result<bool, SharedError> {
        let record = serde_json::to_vec(task).map_err(|e| self.unavailable(e))?;
        let mut c = self.conn.clone();
        let r: i64 = redis::Script::new(FINISH_QUEUED)
            .key(task_key(&task.id))
            .key(queue_key(task))
            .key(format!("{PREFIX}finished"))
            .arg(record)
            .arg(&task.id)
            .arg(EVENTS_CHANNEL)
            .arg(now_ms())
            .arg(index_fields(task))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(r == 1)
    }

    /// A task's stored record, whoever owns it.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`]; [`SharedError::Unreadable`].
    pub async fn get(&self, id: &str) -> Result<Option<Task>, SharedError> {
        let mut c = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(task_key(id))
            .arg("record")
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        raw.map(|r| {
            serde_json::from_slice(&r).map_err(|e| SharedError::Unreadable {
                id: id.to_owned(),
                reason: e.to_string(),
            })
        })
        .transpose()
    }

    /// A page of every task in the shared store matching `filter`, newest first (`page` from
    /// 1), and the exact number matching. No filter, one filter, or status with tool or with
    /// node read one sorted set (`index` or an `ix:*` listing index kept by the scripts): one
    /// script call reading the page's records, O(page + log n). Tool with node reads the
    /// smaller of the two indexes and filters the records (O(that index)).
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn list(
        &self,
        filter: &crate::store::TaskFilter,
        page: usize,
        limit: usize,
    ) -> Result<crate::store::Page, SharedError> {
        let skip = page.saturating_sub(1).saturating_mul(limit);
        let ix = |k: String| format!("{PREFIX}ix:{k}");
        let status = filter.status.map(TaskStatus::as_str);
        let key = match (status, filter.tool.as_deref(), filter.node_id.as_deref()) {
            (None, None, None) => format!("{PREFIX}index"),
            (Some(s), None, None) => ix(format!("status:{s}")),
            (None, Some(t), None) => ix(format!("tool:{t}")),
            (None, None, Some(n)) => ix(format!("node:{n}")),
            (Some(s), Some(t), None) => ix(format!("st:{s}:{t}")),
            (Some(s), None, Some(n)) => ix(format!("sn:{s}:{n}")),
            (s, Some(t), Some(n)) => {
                let (by_tool, by_node) = match s {
                    Some(s) => (ix(format!("st:{s}:{t}")), ix(format!("sn:{s}:{n}"))),
                    None => (ix(format!("tool:{t}")), ix(format!("node:{n}"))),
                };
                return self
                    .list_scan(filter, &by_tool, &by_node, skip, limit)
                    .await;
            }
        };
        let mut c = self.conn.clone();
        if limit == 0 {
            let total: u64 = redis::cmd("ZCARD")
                .arg(&key)
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            return Ok(crate::store::Page {
                tasks: Vec::new(),
                total: usize::try_from(total).unwrap_or(usize::MAX),
            });
        }
        let rows: Vec<Vec<u8>> = redis::Script::new(LIST)
            .key(&key)
            .arg(skip)
            .arg(skip.saturating_add(limit - 1))
            .arg(format!("{PREFIX}task:"))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut rows = rows.into_iter();
        let total = rows
            .next()
            .and_then(|t| std::str::from_utf8(&t).ok()?.parse().ok())
            .unwrap_or(0);
        let tasks = rows
            .filter_map(|raw| serde_json::from_slice::<Task>(&raw).ok())
            .collect();
        Ok(crate::store::Page { tasks, total })
    }

    /// [`SharedRedis::list`] for tool with node: walks the smaller of two listing indexes,
    /// newest first, reading records in batches of 500 and filtering them.
    async fn list_scan(
        &self,
        filter: &crate::store::TaskFilter,
        a: &str,
        b: &str,
        skip: usize,
        limit: usize,
    ) -> Result<crate::store::Page, SharedError> {
        let mut c = self.conn.clone();
        let (na, nb): (u64, u64) = redis::pipe()
            .cmd("ZCARD")
            .arg(a)
            .cmd("ZCARD")
            .arg(b)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(if na <= nb { a } else { b })
            .arg(0)
            .arg(-1)
            .arg("REV")
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut total = 0;
        let mut tasks = Vec::new();
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HGET").arg(task_key(id)).arg("record");
            }
            let rows: Vec<Option<Vec<u8>>> = pipe
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            for raw in rows.into_iter().flatten() {
                let Ok(t) = serde_json::from_slice::<Task>(&raw) else {
                    continue;
                };
                if !filter.matches(&t) {
                    continue;
                }
                if total >= skip && tasks.len() < limit {
                    tasks.push(t);
                }
                total += 1;
            }
        }
        Ok(crate::store::Page { tasks, total })
    }

    /// Deletes up to `max` tasks that finished before `cutoff` (record, idempotency key, index
    /// entries), oldest first. Returns how many. Any hub may run it.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn collect_finished_before(
        &self,
        cutoff: SystemTime,
        max: usize,
    ) -> Result<u64, SharedError> {
        let cutoff_ms = cutoff
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut c = self.conn.clone();
        redis::Script::new(COLLECT)
            .key(format!("{PREFIX}finished"))
            .key(format!("{PREFIX}index"))
            .key(format!("{PREFIX}deadlines"))
            .arg(cutoff_ms)
            .arg(max)
            .arg(format!("{PREFIX}task:"))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// Times out tasks still waiting in a shared queue past their deadline (no hub claimed
    /// them; a claimed task's deadline is its engine's): each gets a `task_timed_out` event and
    /// status `timed_out` with error `task_timeout`, as the engine does. Looks at up to `max`
    /// overdue tasks. Returns how many timed out. Any hub may run it.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`]; [`SharedError::Unreadable`] for a bad record.
    pub async fn expire_queued(&self, max: usize) -> Result<u64, SharedError> {
        let mut c = self.conn.clone();
        let key = format!("{PREFIX}deadlines");
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(max)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut n = 0;
        for id in ids {
            let (state, raw): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
                .arg(task_key(&id))
                .arg("state")
                .arg("record")
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            let (Some(state), Some(raw)) = (state, raw) else {
                let _: i64 = redis::cmd("ZREM")
                    .arg(&key)
                    .arg(&id)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                continue;
            };
            match state.as_str() {
                "queued" => {
                    let mut t: Task =
                        serde_json::from_slice(&raw).map_err(|e| SharedError::Unreadable {
                            id: id.clone(),
                            reason: e.to_string(),
                        })?;
                    time_out_record(&mut t);
                    if self.finish_queued(&t).await? {
                        n += 1;
                    }
                }
                "done" => {}
                _ => continue,
            }
            let _: i64 = redis::cmd("ZREM")
                .arg(&key)
                .arg(&id)
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        Ok(n)
    }

    /// Asks the hub holding task `id` to cancel it ([`CANCEL_CHANNEL`]). Returns how many hubs
    /// heard the request.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn request_cancel(&self, id: &str) -> Result<u64, SharedError> {
        let mut c = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(CANCEL_CHANNEL)
            .arg(id)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// Asks hub `hub` to drain (or undrain) its node `node` ([`NODE_ACTIONS_CHANNEL`]).
    /// Returns how many hubs heard the request.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn request_node_action(
        &self,
        hub: &str,
        node: &str,
        drain: bool,
    ) -> Result<u64, SharedError> {
        let action = NodeAction {
            hub: hub.to_owned(),
            node: node.to_owned(),
            drain,
        };
        let payload = serde_json::to_vec(&action).map_err(|e| self.unavailable(e))?;
        let mut c = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(NODE_ACTIONS_CHANNEL)
            .arg(payload)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// How many tasks wait in `queue`.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn queue_len(&self, queue: &str) -> Result<u64, SharedError> {
        let mut c = self.conn.clone();
        redis::cmd("ZCARD")
            .arg(queue)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// Writes this hub's node into the cluster-wide registry.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn put_node(&self, node: &NodeRecord) -> Result<(), SharedError> {
        let entry = SharedNode {
            node: node.clone(),
            hub: self.hub_id.clone(),
            seen_ms: now_ms(),
        };
        let json = serde_json::to_vec(&entry).map_err(|e| self.unavailable(e))?;
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(format!("{PREFIX}nodes"))
            .arg(&node.id)
            .arg(json)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Every node of the cluster-wide registry (entries that do not decode are skipped with a
    /// warning: one bad entry must not hide the others).
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn nodes(&self) -> Result<Vec<SharedNode>, SharedError> {
        let mut c = self.conn.clone();
        let rows: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(format!("{PREFIX}nodes"))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, raw) in rows {
            match serde_json::from_slice(&raw) {
                Ok(n) => out.push(n),
                Err(e) => {
                    tracing::warn!(node_id = %id, error = %e, "shared node entry does not decode")
                }
            }
        }
        out.sort_by(|a: &SharedNode, b| a.node.id.cmp(&b.node.id));
        Ok(out)
    }

    /// Publishes this hub's node views (id, `GET /v1/nodes` object) in the hash
    /// `apex:shared:node-views` (node id → `{"hub", "seen_ms", "view"}`), so every hub lists
    /// every hub's nodes.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn put_node_views(
        &self,
        views: &[(String, serde_json::Value)],
    ) -> Result<(), SharedError> {
        if views.is_empty() {
            return Ok(());
        }
        let seen_ms = now_ms();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(format!("{PREFIX}node-views"));
        for (id, view) in views {
            let entry = serde_json::json!({"hub": self.hub_id, "seen_ms": seen_ms, "view": view});
            cmd.arg(id).arg(entry.to_string());
        }
        let mut c = self.conn.clone();
        let _: i64 = cmd
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Node views published by other hubs, as (hub id, whether that hub's lease is alive,
    /// milliseconds since its last write, view). Entries that do not decode are skipped.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn other_node_views(
        &self,
    ) -> Result<Vec<(String, bool, u64, serde_json::Value)>, SharedError> {
        let mut c = self.conn.clone();
        let rows: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(format!("{PREFIX}node-views"))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let now = now_ms();
        let mut alive: HashMap<String, bool> = HashMap::new();
        let mut out = Vec::new();
        for (_, raw) in rows {
            let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
                continue;
            };
            let Some(hub) = v["hub"].as_str().map(str::to_owned) else {
                continue;
            };
            if hub == self.hub_id {
                continue;
            }
            let live = match alive.get(&hub) {
                Some(l) => *l,
                None => {
                    let l: bool = redis::cmd("EXISTS")
                        .arg(lease_key(&hub))
                        .query_async(&mut c)
                        .await
                        .map_err(|e| self.unavailable(e))?;
                    alive.insert(hub.clone(), l);
                    l
                }
            };
            let age = now.saturating_sub(v["seen_ms"].as_u64().unwrap_or(0));
            out.push((hub, live, age, v["view"].take()));
        }
        Ok(out)
    }

    /// Takes over the claim on task `id` that a dead hub holds, for this hub, because `node`
    /// (which the record names as running it) reconnected here and says it still holds it. Only
    /// if the task is claimed, assigned or running on `node`, and its owner's lease no longer
    /// holds the claiming epoch (one script checks that the claim and record are unchanged, so
    /// it excludes the reapers' requeue and the old owner's commits); the new claim has this
    /// hub's epoch and `claim + 1`, the record is unchanged.
    ///
    /// # Errors
    /// [`SharedError::Fenced`] if this hub's lease is lost; [`SharedError::Unavailable`];
    /// [`SharedError::Unreadable`] for a bad record.
    pub async fn take_over(&self, id: &str, node: &str) -> Result<TakeOver, SharedError> {
        let mut c = self.conn.clone();
        for _ in 0..3 {
            let h: ClaimFields = redis::cmd("HMGET")
                .arg(task_key(id))
                .arg("record")
                .arg("owner")
                .arg("epoch")
                .arg("claim")
                .arg("state")
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            let (Some(raw), owner, epoch, Some(claim), Some(state)) = h else {
                return Ok(TakeOver::Refused("the shared store has no such task"));
            };
            if state != "claimed" {
                return Ok(TakeOver::Refused(
                    "the task is not held by any hub (finished or requeued)",
                ));
            }
            let (Some(owner), Some(epoch)) = (owner, epoch) else {
                return Ok(TakeOver::Refused("the task has no owner"));
            };
            if owner == self.hub_id {
                return Ok(TakeOver::Refused("this hub holds the task already"));
            }
            let task: Task = serde_json::from_slice(&raw).map_err(|e| SharedError::Unreadable {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
            if !matches!(task.status, TaskStatus::Assigned | TaskStatus::Running)
                || task.node_id.as_deref() != Some(node)
            {
                return Ok(TakeOver::Refused("the task is not assigned to this node"));
            }
            let r: String = redis::Script::new(TAKE_OVER)
                .key(task_key(id))
                .key(lease_key(&owner))
                .key(owned_key(&owner))
                .key(lease_key(&self.hub_id))
                .key(owned_key(&self.hub_id))
                .arg(&owner)
                .arg(&epoch)
                .arg(&claim)
                .arg(raw)
                .arg(&self.hub_id)
                .arg(self.epoch())
                .arg(id)
                .arg(EVENTS_CHANNEL)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.classify(e))?;
            match r.as_str() {
                "alive" => return Ok(TakeOver::Wait),
                "changed" => continue,
                n => {
                    let claim = n.parse().map_err(|_| {
                        self.unavailable("unexpected reply of the take-over script")
                    })?;
                    return Ok(TakeOver::Taken(Box::new(Claimed { task, claim })));
                }
            }
        }
        // Changing under us (its old owner is still committing): ask again later.
        Ok(TakeOver::Wait)
    }

    /// Whether `node` re-registered at a live hub other than `dead` less than the hand-over
    /// window ago ([`HANDOVER_WINDOW_LEASES`] lease lifetimes): that hub is taking over the
    /// tasks `dead` assigned to it, so the reaper leaves them alone meanwhile.
    async fn handing_over(&self, node: &str, dead: &str) -> Result<bool, SharedError> {
        let mut c = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(format!("{PREFIX}nodes"))
            .arg(node)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(entry) = raw.and_then(|r| serde_json::from_slice::<SharedNode>(&r).ok()) else {
            return Ok(false);
        };
        let window = HANDOVER_WINDOW_LEASES.saturating_mul(self.lease_ttl_ms);
        if entry.hub == dead || now_ms().saturating_sub(entry.seen_ms) >= window {
            return Ok(false);
        }
        redis::cmd("EXISTS")
            .arg(lease_key(&entry.hub))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// One reaper pass: for every other hub whose lease is gone, requeues each task it had
    /// claimed (a `task_migrated` event; attempt + 1 at its next assignment) or, if the task
    /// used all its attempts, fails it with `node_lost`; a hub with nothing left is forgotten.
    /// Safe to run on every hub at once: each requeue is conditional on the claim it read.
    ///
    /// # Errors
    /// [`SharedError::Unavailable`].
    pub async fn reap(&self) -> Result<Reaped, SharedError> {
        let mut out = Reaped::default();
        let mut c = self.conn.clone();
        let hubs: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{PREFIX}hubs"))
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        for hub in hubs {
            if hub == self.hub_id {
                continue;
            }
            let alive: bool = redis::cmd("EXISTS")
                .arg(lease_key(&hub))
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            if alive {
                continue;
            }
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(owned_key(&hub))
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            for id in ids {
                let h: ClaimFields = redis::cmd("HMGET")
                    .arg(task_key(&id))
                    .arg("record")
                    .arg("owner")
                    .arg("epoch")
                    .arg("claim")
                    .arg("state")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                let (Some(raw), Some(owner), Some(epoch), Some(claim), Some(state)) = h else {
                    // Finished or deleted meanwhile: drop the stale membership.
                    let _: redis::RedisResult<i64> = redis::cmd("SREM")
                        .arg(owned_key(&hub))
                        .arg(&id)
                        .query_async(&mut c)
                        .await;
                    continue;
                };
                if owner != hub || state != "claimed" {
                    continue;
                }
                let mut task: Task =
                    serde_json::from_slice(&raw).map_err(|e| SharedError::Unreadable {
                        id: id.clone(),
                        reason: e.to_string(),
                    })?;
                // Its node reconnected to a live hub, which takes the claim over instead.
                if matches!(task.status, TaskStatus::Assigned | TaskStatus::Running)
                    && let Some(node) = task.node_id.as_deref()
                    && self.handing_over(node, &hub).await?
                {
                    out.handing_over += 1;
                    continue;
                }
                let failed = requeue_record(&mut task, &hub);
                let record = serde_json::to_vec(&task).map_err(|e| self.unavailable(e))?;
                let r: i64 = redis::Script::new(REQUEUE)
                    .key(task_key(&id))
                    .key(lease_key(&hub))
                    .key(owned_key(&hub))
                    .key(queue_key(&task))
                    .key(format!("{PREFIX}finished"))
                    .arg(&hub)
                    .arg(&epoch)
                    .arg(&claim)
                    .arg(record)
                    .arg(if failed { "done" } else { "queued" })
                    .arg(score(&task))
                    .arg(&id)
                    .arg(EVENTS_CHANNEL)
                    .arg(WAKE_CHANNEL)
                    .arg(now_ms())
                    .arg(index_fields(&task))
                    .invoke_async(&mut c)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                if r == 1 {
                    if failed {
                        out.failed += 1;
                    } else {
                        out.requeued += 1;
                    }
                }
            }
            let r: i64 = redis::Script::new(FORGET_HUB)
                .key(format!("{PREFIX}hubs"))
                .key(lease_key(&hub))
                .key(owned_key(&hub))
                .arg(&hub)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            out.hubs_forgotten += u64::try_from(r).unwrap_or(0);
        }
        Ok(out)
    }
}

/// A task's deadline in ms since the Unix epoch: `created_at + timeout_seconds`.
fn deadline_ms(task: &Task) -> u64 {
    let created = task
        .created_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    let ms = created + task.spec.timeout_seconds.max(0.0) * 1000.0;
    if ms.is_finite() && ms < 9.0e15 {
        ms as u64
    } else {
        9_000_000_000_000_000
    }
}

/// Ends a queued task's record as timed out (as the engine's deadline does).
fn time_out_record(t: &mut Task) {
    let now = SystemTime::now();
    let err = ErrorInfo::new("task_timeout", "the task ran past its timeout");
    t.status = TaskStatus::TimedOut;
    t.updated_at = now;
    t.finished_at = Some(now);
    t.message = Some(err.message.clone());
    t.error = Some(err.clone());
    t.events.push(TaskEvent {
        kind: EventKind::TaskTimedOut,
        task_id: t.id.clone(),
        seq: u32::try_from(t.events.len() + 1).unwrap_or(u32::MAX),
        attempt: t.attempt,
        node_id: t.node_id.clone(),
        status: t.status,
        progress: None,
        message: None,
        error: Some(err),
        timestamp: now,
    });
}

/// Turns the record of a task held by dead hub `hub` into its next state, as the engine's
/// migration does for a lost node: back to `queued` with a `task_migrated` event, or `failed`
/// with `node_lost` when it used all its attempts. A task the hub claimed but never assigned
/// (still `queued` in its record) goes back unchanged. Returns whether it failed.
pub fn requeue_record(task: &mut Task, hub: &str) -> bool {
    if task.status == TaskStatus::Queued || task.status.is_terminal() {
        return false;
    }
    let now = SystemTime::now();
    let (attempt, max) = (task.attempt, task.spec.max_attempts);
    let from = task.node_id.clone().unwrap_or_default();
    let failed = attempt >= max;
    let (kind, msg, error) = if failed {
        let msg = format!("hub {hub} (holding node {from}) was lost on attempt {attempt} of {max}");
        (
            EventKind::TaskFailed,
            msg.clone(),
            Some(ErrorInfo::new("node_lost", msg)),
        )
    } else {
        (
            EventKind::TaskMigrated,
            format!(
                "hub {hub} (holding node {from}) was lost; requeued for attempt {}",
                attempt + 1
            ),
            None,
        )
    };
    task.status = if failed {
        TaskStatus::Failed
    } else {
        TaskStatus::Queued
    };
    task.updated_at = now;
    task.message = Some(msg.clone());
    if failed {
        task.error = error.clone();
        task.finished_at = Some(now);
    }
    task.events.push(TaskEvent {
        kind,
        task_id: task.id.clone(),
        seq: u32::try_from(task.events.len() + 1).unwrap_or(u32::MAX),
        attempt,
        node_id: Some(from),
        status: task.status,
        progress: None,
        message: Some(msg),
        error,
        timestamp: now,
    });
    failed
}

/// Claim tokens of the tasks a hub's engine holds in shared mode: task id → claim number. The
/// claimer adds one per adopted task; the [`SharedBackend`] reads them to fence every commit and
/// removes a task's once it is released (finished, handed back, or fenced).
#[derive(Debug, Clone, Default)]
pub struct Claims(Arc<parking_lot::Mutex<HashMap<String, u64>>>);

impl Claims {
    /// Records that this hub holds `id` under `claim`.
    pub fn insert(&self, id: &str, claim: u64) {
        self.0.lock().insert(id.to_owned(), claim);
    }

    /// The claim this hub holds `id` under, if any.
    pub fn get(&self, id: &str) -> Option<u64> {
        self.0.lock().get(id).copied()
    }

    /// Forgets `id`.
    pub fn remove(&self, id: &str) {
        self.0.lock().remove(id);
    }

    /// Every task id this hub holds.
    pub fn ids(&self) -> Vec<String> {
        self.0.lock().keys().cloned().collect()
    }

    /// How many tasks this hub holds.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// Whether this hub holds no task.
    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }
}

/// The [`Backend`](super::Backend) of shared mode, for [`MirroredStore`](super::MirroredStore)'s
/// writer thread: each put of a task this hub holds (see [`Claims`]) becomes a fenced
/// [`SharedRedis::commit`]; puts of tasks it does not hold are not written (the hub has no right
/// to them); node records go to the cluster-wide registry. A fenced commit is not an error of
/// the batch: the task is forgotten in [`Claims`] and its id sent on the `fenced` channel, so
/// the engine can drop it (another hub owns it now).
pub struct SharedBackend {
    rt: tokio::runtime::Runtime,
    redis: SharedRedis,
    claims: Claims,
    fenced: tokio::sync::mpsc::UnboundedSender<String>,
}

impl SharedBackend {
    /// A backend committing as `hub` (its own connection, on a runtime of its own, sharing
    /// the hub's epoch). Call from a thread that is not running a Tokio runtime (the writer
    /// thread).
    ///
    /// # Errors
    /// [`super::StoreError::Unavailable`] if Redis cannot be reached.
    pub fn open(
        url: &str,
        hub: &HubIdentity,
        claims: Claims,
        fenced: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<Self, super::StoreError> {
        let what = super::redis::redacted(url);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| super::StoreError::Unavailable {
                what: what.clone(),
                reason: one_line(e),
            })?;
        let redis = rt.block_on(SharedRedis::attach(url, hub)).map_err(|e| {
            super::StoreError::Unavailable {
                what: what.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            rt,
            redis,
            claims,
            fenced,
        })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> super::StoreError {
        super::StoreError::Unavailable {
            what: self.redis.what.clone(),
            reason: one_line(e),
        }
    }
}

/// Commits per script call in [`SharedBackend`]'s writes.
const COMMIT_CHUNK: usize = 256;

/// The fields of a stored record that place a commit (the rest is written as it is).
#[derive(Deserialize)]
struct RecordHead {
    status: TaskStatus,
    spec: SpecHead,
    #[serde(default)]
    node_id: Option<String>,
}

/// See [`RecordHead`].
#[derive(Deserialize)]
struct SpecHead {
    tool: String,
    priority: i32,
    pinned_node: Option<String>,
}

impl super::Backend for SharedBackend {
    fn load(&mut self) -> Result<(Vec<Task>, Vec<NodeRecord>), super::StoreError> {
        // A shared-mode hub starts empty: its tasks come from claims.
        Ok((Vec::new(), Vec::new()))
    }

    fn write(
        &mut self,
        puts: &[(&str, u64, Vec<u8>)],
        nodes: &[(&str, Vec<u8>)],
        _deletes: &[(&str, u64)],
    ) -> Result<(), super::StoreError> {
        // Held tasks only, in chunks of `COMMIT_CHUNK`, one script call per chunk; each commit
        // is fenced on its own. The record is written as the writer encoded it (no re-encode);
        // only the fields that place it are decoded.
        let mut commits = Vec::new();
        let mut terminal = Vec::new();
        for (id, _, record) in puts {
            let Some(claim) = self.claims.get(id) else {
                continue;
            };
            let head: RecordHead =
                serde_json::from_slice(record).map_err(|e| self.unavailable(e))?;
            terminal.push(head.status.is_terminal());
            commits.push(Commit {
                id,
                claim,
                record,
                next: if head.status.is_terminal() {
                    NextState::Done
                } else {
                    NextState::Claimed
                },
                queue: match &head.spec.pinned_node {
                    Some(node) => pinned_queue(node),
                    None => tool_queue(&head.spec.tool),
                },
                score: -f64::from(head.spec.priority),
                index: vec![
                    head.status.as_str().to_owned(),
                    head.spec.tool,
                    head.node_id.unwrap_or_default(),
                ],
            });
        }
        for (chunk, done) in commits
            .chunks(COMMIT_CHUNK)
            .zip(terminal.chunks(COMMIT_CHUNK))
        {
            let results = self
                .rt
                .block_on(self.redis.commit_batch(chunk))
                .map_err(|e| self.unavailable(e))?;
            for ((c, done), r) in chunk.iter().zip(done).zip(results) {
                match r {
                    Ok(()) => {
                        if *done {
                            self.claims.remove(c.id);
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(task_id = %c.id, reason, "commit fenced: another hub holds the task now");
                        self.claims.remove(c.id);
                        let _ = self.fenced.send(c.id.to_owned());
                    }
                }
            }
        }
        for (_, raw) in nodes {
            let node: NodeRecord = serde_json::from_slice(raw).map_err(|e| self.unavailable(e))?;
            self.rt
                .block_on(self.redis.put_node(&node))
                .map_err(|e| self.unavailable(e))?;
        }
        Ok(())
    }
}

/// What a shared-mode hub runs on: its Redis handle, the claims its engine holds, and the ids
/// whose commits were fenced (to drop from the engine).
pub struct SharedHandles {
    /// The Redis URL (for pub/sub connections).
    pub url: String,
    /// The hub's handle (lease, claims, submissions, reads).
    pub redis: Arc<SharedRedis>,
    /// Claim tokens of the tasks the engine holds.
    pub claims: Claims,
    /// Ids of fenced commits, from the store's writer thread.
    pub fenced: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// Joins the shared store at `url` as `hub_id` and opens the engine's store over it
/// ([`super::open_shared`]).
///
/// # Errors
/// [`super::StoreError::Unavailable`] if Redis cannot be reached.
pub async fn open_hub(url: &str, hub_id: &str) -> Result<super::Opened, super::StoreError> {
    open_hub_with(url, hub_id, DEFAULT_LEASE_TTL_MS).await
}

/// [`open_hub`] with a lease lifetime of `lease_ttl_ms` (config `shared_lease_ttl_ms`).
///
/// # Errors
/// [`super::StoreError::Unavailable`] if Redis cannot be reached.
pub async fn open_hub_with(
    url: &str,
    hub_id: &str,
    lease_ttl_ms: u64,
) -> Result<super::Opened, super::StoreError> {
    let redis = SharedRedis::join(url, hub_id, lease_ttl_ms)
        .await
        .map_err(|e| super::StoreError::Unavailable {
            what: super::redis::redacted(url),
            reason: e.to_string(),
        })?;
    let claims = Claims::default();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut opened = super::open_shared(url, redis.identity(), claims.clone(), tx).await?;
    opened.shared = Some(SharedHandles {
        url: url.to_owned(),
        redis: Arc::new(redis),
        claims,
        fenced: rx,
    });
    Ok(opened)
}
