-- Deliver a chunk of results lines, each to its caller or back to intake for another attempt; charge every
-- succeeded line to the ledger exactly once, whatever happens to it. One call per chunk: the keys and
-- settings the lines share are passed once, and each line as two arguments (each one costs the client and
-- Redis about a microsecond to pass: a chunk has 500 lines).
-- KEYS[1] intake stream, KEYS[2] queue stats, KEYS[3] today's ledger hash, KEYS[4] ledger days zset,
-- KEYS[5] tag sets hash, KEYS[6] the batch's billed set.
-- ARGV[1] max attempts, ARGV[2] result TTL (s), ARGV[3] pub/sub channel, ARGV[4] today (UTC, YYYY-MM-DD),
-- ARGV[5] today as YYYYMMDD, ARGV[6] budget key prefix (the day is appended), ARGV[7] budget TTL (s),
-- ARGV[8] prefix-state key prefix (the prefix id is appended), ARGV[9] dedupe window (s), ARGV[10] request
-- key prefix, ARGV[11] and ARGV[12] what comes before and after the rid in a result key (keys.py's
-- formats: a line's two keys are built from its rid), then per line (2 each): the line (JSON), and its
-- fields joined by tabs: the attempt it answers, retry? ("1": the result is transient), rid, the custom id
-- of the next attempt (used only when the request is sent back), this line's custom id, and its charge
-- ("" unless it succeeded: the records.Charge fields joined by tabs, see _ledger.lua).
-- Returns per line {code, enq_ms, attempts, charged, followers}, flattened: code 1 delivered, 2 requeued,
-- 0 duplicate (already answered), -1 stale (a line for an attempt that is not the current one, or a request
-- batchd does not know); charged 1 if this call added the line to the ledger; followers: deduped callers
-- answered with it.
-- NX and the attempt check make a repeated fan-out harmless: nothing is ever answered twice, and the billed
-- set makes sure nothing is charged twice: the API bills every succeeded line once, delivered or not.
-- Each line stands alone, so a chunk cut short by an error is simply delivered again.
-- The rids answered by the call (followers included) are published once at its end, joined by commas (rids
-- never hold one): one message a chunk instead of one a line. A call cut short publishes nothing; its
-- waiters are woken by their listener's sweep (waiter.py) instead.
--#include _ledger
-- The ledger's and budgets' increments of the whole chunk are summed and written once (flush_deferred).
deferred = true
local max_attempts, ttl, channel = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local today, score, budget_prefix, budget_ttl = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local prefix_prefix, window = ARGV[8], tonumber(ARGV[9])
local req_prefix, res_head, res_tail = ARGV[10], ARGV[11], ARGV[12]
local intake, queue_stats, ledger, days = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local tag_sets, billed = KEYS[5], KEYS[6]
-- Custom ids charged by this call: added to the billed set with the ledger's sums, at the end, so a call
-- cut short writes neither (its lines are charged when the chunk is delivered again).
local billed_now, billed_new = {}, {}
-- Custom ids in the billed set before this call (one SMISMEMBER for the chunk, not a SISMEMBER a line).
local billed_before = {}
-- Rids answered by this call, published in one message at the end.
local woken = {}
-- The budget scopes of each tag set met in this call (read from the tag sets hash once, not once a line).
local scopes_of = {}

local function deliver_one(req, res, line_attempt, line, retry, rid, next_cid, cid, charge)
  local f = redis.call('HMGET', req, 'state', 'attempts', 'enq', 'bytes', 'cancel', 'group', 'pfx', 'pttl',
    'tags', 'est', 'bday', 'dd')
  local state, attempts = f[1], tonumber(f[2])
  local succeeded = charge ~= ''
  local tagset = f[9] or ''

  -- A canceled request that deduped callers follow (cancel.lua) has its caller's answer already, and goes on.
  local detached = f[5] and f[12]
  -- A result key is only ever written with state=done (or by cancel.lua on a detached request), so its
  -- EXISTS is read only where state alone does not tell: an unknown request, a line that would requeue. On
  -- the common path the SET NX is the check: it fails when the request has its answer already.
  local code
  if state == 'done' then
    code = 0
  elseif not state then
    code = redis.call('EXISTS', res) == 1 and 0 or -1
  elseif attempts ~= line_attempt or state == 'queued' or state == 'following' then
    code = -1
  elseif retry == '1' and attempts < max_attempts and (not f[5] or f[12]) then
    -- A canceled request is not retried, unless deduped callers still wait on it (f[12]).
    code = (not detached and redis.call('EXISTS', res) == 1) and 0 or 2
  elseif redis.call('SET', res, line, 'NX', 'EX', ttl) or detached then
    code = 1
  else
    code = 0
  end

  -- The ledger, and the request's budget reservation (its estimate) settled by its final line.
  local charged = 0
  local c = nil
  if succeeded then
    c = split_charge(charge)
    if not billed_now[cid] and not billed_before[cid] then
      billed_now[cid] = true
      billed_new[#billed_new + 1] = cid
      charged = 1
      ledger_charge(ledger, days, today, score, tagset, c, code == 1)
    end
  end
  local settles = f[10] and attempts == line_attempt and (code == 1 or code == 0)
  if settles or charged == 1 then
    local scopes = scopes_of[tagset]
    if not scopes then
      scopes = budget_scopes(tag_sets, tagset)
      scopes_of[tagset] = scopes
    end
    local bkey = budget_prefix .. (f[11] or today)
    local amount = 0
    if charged == 1 then
      amount = tonumber(c[8])
    end
    if settles then
      amount = amount - tonumber(f[10])
      if code ~= 1 then
        redis.call('HDEL', req, 'est') -- a delivered line drops it with the params, below
      end
    end
    budget_add(bkey, scopes, amount, budget_ttl)
  end

  -- A prompt-cache prefix is warm once one of its requests was answered; a failed primer frees it.
  if f[7] and (code == 1 or code == 2) then
    local pkey = prefix_prefix .. f[7]
    if succeeded then
      redis.call('SET', pkey, 'w', 'EX', tonumber(f[8]) or 300)
    elseif redis.call('GET', pkey) == 'p' then
      redis.call('DEL', pkey)
    end
  end

  if code <= 0 then
    return code, f[3] or 0, attempts or 0, charged, 0
  end
  if code == 2 then
    local next_attempt = attempts + 1
    redis.call('HSET', req, 'state', 'queued', 'attempts', next_attempt)
    redis.call('HDEL', req, 'fid')
    local entry = {'rid', rid, 'cid', next_cid, 'bytes', f[4]}
    if f[6] then
      entry[#entry + 1] = 'group'
      entry[#entry + 1] = f[6]
    end
    if f[7] then
      entry[#entry + 1] = 'pfx'
      entry[#entry + 1] = f[7]
    end
    redis.call('XADD', intake, '*', unpack(entry))
    redis.call('HINCRBY', queue_stats, 'requests', 1)
    redis.call('HINCRBY', queue_stats, 'bytes', tonumber(f[4]))
    return 2, f[3], next_attempt, charged, 0
  end

  -- Answered (its result key was set above).
  redis.call('HSET', req, 'state', 'done')
  -- The params are not needed any more; nor is the estimate the line settled.
  if settles then
    redis.call('HDEL', req, 'body', 'est')
  else
    redis.call('HDEL', req, 'body')
  end
  redis.call('EXPIRE', req, ttl)
  woken[#woken + 1] = rid

  -- Deduped callers following this request get the same answer; a succeeded one is kept for the window.
  local followers = 0
  if f[12] then
    local dd = f[12]
    local record = redis.call('HGETALL', dd)
    local owner = nil
    local waiting = {}
    for i = 1, #record, 2 do
      local name = record[i]
      if name == 'rid' then
        owner = record[i + 1]
      elseif string.sub(name, 1, 2) == 'f:' then
        waiting[#waiting + 1] = name
        local req_key, res_key, follower_tags = string.match(record[i + 1], '^([^\t]*)\t([^\t]*)\t(.*)$')
        if req_key and redis.call('HGET', req_key, 'state') == 'following' then
          redis.call('SET', res_key, line, 'NX', 'EX', ttl)
          redis.call('HSET', req_key, 'state', 'done')
          redis.call('EXPIRE', req_key, ttl)
          woken[#woken + 1] = string.sub(name, 3)
          followers = followers + 1
          if succeeded then
            ledger_reuse(ledger, days, today, score, follower_tags, c[1], c[9])
          end
        end
      end
    end
    if owner == rid then
      if #waiting > 0 then
        redis.call('HDEL', dd, unpack(waiting))
      end
      if succeeded and window > 0 then
        redis.call('HSET', dd, 'ok', 1, 'std', c[9], 'model', c[1])
        redis.call('EXPIRE', dd, window)
      else
        redis.call('DEL', dd)
      end
    end
  end
  return 1, f[3], attempts, charged, followers
end

local FIRST = 12
local nlines = (#ARGV - FIRST) / 2
local lines = {}
local charged_cids = {}
for i = 1, nlines do
  local a = FIRST + (i - 1) * 2
  local attempt, retry, rid, next_cid, cid, charge =
    string.match(ARGV[a + 2], '^(%d+)\t([01])\t([^\t]+)\t([^\t]+)\t([^\t]+)\t(.*)$')
  lines[i] = {tonumber(attempt), retry, rid, next_cid, cid, charge}
  if charge ~= '' then
    charged_cids[#charged_cids + 1] = cid
  end
end
if #charged_cids > 0 then
  local member = redis.call('SMISMEMBER', billed, unpack(charged_cids))
  for i, cid in ipairs(charged_cids) do
    if member[i] == 1 then
      billed_before[cid] = true
    end
  end
end

local out, n = {}, 0
for i = 1, nlines do
  local m = lines[i]
  local rid = m[3]
  local line = ARGV[FIRST + (i - 1) * 2 + 1]
  local req, res = req_prefix .. rid, res_head .. rid .. res_tail
  -- Five values returned, not a table: no table made and copied per line.
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] =
    deliver_one(req, res, m[1], line, m[2], rid, m[4], m[5], m[6])
  n = n + 5
end
if #billed_new > 0 then
  redis.call('SADD', billed, unpack(billed_new))
end
flush_deferred()
if #woken > 0 then
  redis.call('PUBLISH', channel, table.concat(woken, ','))
end
return out
