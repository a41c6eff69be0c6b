"""The Lua scripts behind every job state change that touches more than one key.

The job scripts (START, FINISH, CANCEL, REQUEUE, RETRY) take a job's keys as
KEYS, in the order of :class:`mlxq.jobs.store.JobKeys`, and name them first
thing (:data:`_JOB_KEYS`); each then names its ARGV. CLAIM_UNSENT, RENEW and
DUE take one sorted set. A lease member is ``JOB:INDEX``; its score is the time
(Unix seconds) at which it lapses unless the worker running the request renews
it.
Statuses are the values of :class:`~mlxq.jobs.models.JobStatus` and
:class:`~mlxq.jobs.models.RequestStatus`. A queued request has no field in the
job's ``states`` hash (so a queued request costs no state): absent means queued,
for an index below the job's ``total``; the others are ``running``,
``completed``, ``failed``, ``cancelled``.

One clock: every time a script stores or compares (a lease's lapse, a
sender's claim, ``started_at``...) is the Redis server's, read with ``TIME``
inside the script, never a time passed in by a worker or a submitter, whose
clocks may be minutes apart (:data:`_NOW`).
"""

__all__ = ["START", "FINISH", "CANCEL", "REQUEUE", "RETRY", "CLAIM_UNSENT", "RENEW", "DUE"]

# The Redis server's clock, in Unix seconds (microsecond resolution).
_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS of the job scripts: JobKeys' fields, in order. `own` are the keys that
# expire with the job (all but the shared lease set).
_JOB_KEYS = _NOW + """
local job, states, results, requests, custom_ids, events, attempts, leases =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local own = {job, states, results, requests, custom_ids, events, attempts}

-- A key the job's scripts create after the job was stored (states, results,
-- attempts) expires when the job's hash does.
local function expire_with_job(key)
  if redis.call('PTTL', key) == -1 then
    local ttl = redis.call('PTTL', job)
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  end
end
"""

# Settles the job when every request has ended: completed, or cancelled when
# it was cancelling; the job's keys then expire after its retention.
_SETTLE = _JOB_KEYS + """
local function settle(now)
  local c = redis.call('HMGET', job, 'total', 'completed', 'failed', 'cancelled', 'status', 'retention')
  if tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) < tonumber(c[1]) then return end
  local final = 'completed'
  if c[5] == 'cancelling' or c[5] == 'cancelled' then final = 'cancelled' end
  redis.call('HSET', job, 'status', final, 'finished_at', now)
  for _, key in ipairs(own) do redis.call('EXPIRE', key, tonumber(c[6]) or 604800) end
end
"""

# Claims request `index` for a worker under a lease.
# Returns 1: queued -> running, run it; 2: it was running under a lapsed lease
# (its worker died), take it over; 0: do not run it (ended, cancelled, live on
# another worker: a duplicate delivery, or no such index); -1: no such job;
# -2: it has used up its attempts (the caller records the failure).
START = _JOB_KEYS + """
local index, lease, max_attempts, member = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local now = server_now()
local j = redis.call('HMGET', job, 'status', 'total')
local st = j[1]
if not st then return -1 end
if st == 'cancelling' or st == 'cancelled' then return 0 end
local s = redis.call('HGET', states, index)
if s == 'running' then
  local lapses = redis.call('ZSCORE', leases, member)
  if lapses and tonumber(lapses) > now then return 0 end
elseif s or tonumber(index) < 0 or tonumber(index) >= tonumber(j[2]) then
  return 0
end
if redis.call('HINCRBY', attempts, index, 1) > max_attempts then return -2 end
redis.call('ZADD', leases, now + lease, member)
expire_with_job(attempts)
if s == 'running' then return 2 end
redis.call('HSET', states, index, 'running')
expire_with_job(states)
redis.call('HINCRBY', job, 'queued', -1)
redis.call('HINCRBY', job, 'running', 1)
if st == 'queued' then redis.call('HSET', job, 'status', 'running', 'started_at', now) end
return 1
"""

# Records a request's end once (a request START took: running, or queued when
# it used up its attempts).
# Returns 1 when recorded, 0 when the request had already ended (no change).
FINISH = _SETTLE + """
local index, status, line, member, tokens, prompt_tokens, cached_tokens =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local s = redis.call('HGET', states, index) or 'queued'
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', states, index, status)
redis.call('HSET', results, index, line)
expire_with_job(states)
expire_with_job(results)
redis.call('HINCRBY', job, s, -1)
redis.call('HINCRBY', job, status, 1)
redis.call('ZREM', leases, member)
redis.call('HINCRBY', job, 'tokens', tokens)
redis.call('HINCRBY', job, 'prompt_tokens', prompt_tokens)
redis.call('HINCRBY', job, 'cached_tokens', cached_tokens)
settle(server_now())
return 1
"""

# Queued requests become cancelled; the job is cancelling while a request
# still runs, else cancelled. Returns the job's status, or nil.
CANCEL = _SETTLE + """
local c = redis.call('HMGET', job, 'status', 'total')
local st = c[1]
if not st then return nil end
if st == 'completed' or st == 'cancelled' then return st end
local n = 0
for i = 0, tonumber(c[2]) - 1 do
  n = n + redis.call('HSETNX', states, tostring(i), 'cancelled')  -- only the queued: they have no state
end
expire_with_job(states)
if n > 0 then
  redis.call('HINCRBY', job, 'queued', 0 - n)
  redis.call('HINCRBY', job, 'cancelled', n)
end
redis.call('HSET', job, 'status', 'cancelling')
settle(server_now())
return redis.call('HGET', job, 'status')
"""

# Puts a running request back: one with a lapsed lease, or with `release` '1'
# one this worker holds (it is shutting down). The request goes back to queued
# (1; the caller sends it again) or, in a cancelling job, ends cancelled (2).
# 0: the lease was renewed or is gone.
REQUEUE = _SETTLE + """
local index, member, release = ARGV[1], ARGV[2], ARGV[3]
local now = server_now()
local lapses = redis.call('ZSCORE', leases, member)
if not lapses then return 0 end
if release ~= '1' and tonumber(lapses) > now then return 0 end
redis.call('ZREM', leases, member)
if redis.call('HGET', states, index) ~= 'running' then return 0 end
redis.call('HINCRBY', job, 'running', -1)
if redis.call('HGET', job, 'status') == 'cancelling' then
  redis.call('HSET', states, index, 'cancelled')
  redis.call('HINCRBY', job, 'cancelled', 1)
  settle(now)
  return 2
end
redis.call('HDEL', states, index)
redis.call('HINCRBY', job, 'queued', 1)
return 1
"""

# Failed requests go back to queued, except those whose input was invalid
# (they would fail again); the job's keys expire after `retention` again.
# Returns their indices, or nil for no such job.
RETRY = _JOB_KEYS + """
local retention = ARGV[1]
if not redis.call('HGET', job, 'status') then return nil end
local all = redis.call('HGETALL', states)
local out = {}
for i = 1, #all, 2 do
  if all[i + 1] == 'failed' then
    local line = cjson.decode(redis.call('HGET', results, all[i]))
    if type(line.error) ~= 'table' or line.error.code ~= 'invalid_request' then
      redis.call('HDEL', states, all[i])
      redis.call('HDEL', results, all[i])
      redis.call('HDEL', attempts, all[i])
      table.insert(out, all[i])
    end
  end
end
if #out > 0 then
  redis.call('HINCRBY', job, 'failed', 0 - #out)
  redis.call('HINCRBY', job, 'queued', #out)
  local st = redis.call('HGET', job, 'status')
  if st == 'completed' or st == 'cancelled' then
    redis.call('HSET', job, 'status', 'queued')
    redis.call('HDEL', job, 'finished_at')
  end
  for _, key in ipairs(own) do redis.call('EXPIRE', key, retention) end
end
return out
"""

# Claims the jobs nobody sends for: those whose sender's claim ran out (score
# <= now) and those released to workers (score 0): pushes their deadline
# `grace` seconds past now, so that one caller at a time sends for each.
# Returns id, old score, id, old score...: an old score above 0 was a sender's
# claim that ran out (it died). KEYS: the model's unsent set. ARGV: grace
# (seconds), limit (most jobs claimed).
CLAIM_UNSENT = _NOW + """
local unsent = KEYS[1]
local grace, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = server_now()
local found = redis.call('ZRANGEBYSCORE', unsent, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #found, 2 do
  redis.call('ZADD', unsent, now + grace, found[i])
end
return found
"""

# Pushes the deadline of members that are still in a sorted set (leases, claims)
# to `seconds` past now; adds none back. KEYS: the set. ARGV: seconds, members...
RENEW = _NOW + """
local set = KEYS[1]
local until_ = server_now() + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', set, 'XX', until_, ARGV[i])
end
return #ARGV - 1
"""

# Members of a sorted set whose deadline has passed (score <= now), at most
# `limit`. KEYS: the set. ARGV: limit.
DUE = _NOW + """
local set = KEYS[1]
return redis.call('ZRANGEBYSCORE', set, '-inf', server_now(), 'LIMIT', 0, tonumber(ARGV[1]))
"""
