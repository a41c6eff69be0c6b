"""The Lua scripts behind every job state change that touches more than one key.

Each script gets the same KEYS, in this order (see :meth:`JobStore._keys`):

    KEYS[1] job hash      KEYS[2] state hash    KEYS[3] result hash
    KEYS[4] request hash  KEYS[5] custom_id hash KEYS[6] event Stream
    KEYS[7] attempts hash KEYS[8] the global lease sorted set

A lease member is ``JOB:INDEX``; its score is the time (Unix seconds) at which
it lapses unless the worker running the request renews it.
"""

__all__ = ["START", "FINISH", "CANCEL", "REQUEUE", "RETRY"]

# Settles the job when every request has ended: completed, or cancelled when
# it was cancelling; the job's keys then expire after its retention.
_SETTLE = """
local function settle(now)
  local c = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed', 'cancelled', 'status', 'retention')
  if tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) < tonumber(c[1]) then return end
  local final = 'completed'
  if c[5] == 'cancelling' or c[5] == 'cancelled' then final = 'cancelled' end
  redis.call('HSET', KEYS[1], 'status', final, 'finished_at', now)
  for i = 1, 7 do redis.call('EXPIRE', KEYS[i], tonumber(c[6]) or 604800) end
end
"""

# ARGV[1] index, ARGV[2] now, ARGV[3] lease seconds, ARGV[4] max attempts,
# ARGV[5] lease member.
# Returns 1: queued -> running, run it; 2: it was running under a lapsed lease
# (its worker died), take it over; 0: do not run it (ended, cancelled, or live
# on another worker: a duplicate delivery); -1: no such job; -2: it has used up
# its attempts (the caller records the failure).
START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return -1 end
if st == 'cancelling' or st == 'cancelled' then return 0 end
local idx, now = ARGV[1], tonumber(ARGV[2])
local s = redis.call('HGET', KEYS[2], idx)
if s == 'running' then
  local lapses = redis.call('ZSCORE', KEYS[8], ARGV[5])
  if lapses and tonumber(lapses) > now then return 0 end
elseif s ~= 'queued' then
  return 0
end
if redis.call('HINCRBY', KEYS[7], idx, 1) > tonumber(ARGV[4]) then return -2 end
redis.call('ZADD', KEYS[8], now + tonumber(ARGV[3]), ARGV[5])
if s == 'running' then return 2 end
redis.call('HSET', KEYS[2], idx, 'running')
redis.call('HINCRBY', KEYS[1], 'queued', -1)
redis.call('HINCRBY', KEYS[1], 'running', 1)
if st == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2]) end
return 1
"""

# ARGV[1] index, ARGV[2] final request status, ARGV[3] result line JSON,
# ARGV[4] now, ARGV[5] lease member, ARGV[6] tokens generated.
# Returns 1 when recorded, 0 when the request had already ended (no change).
FINISH = _SETTLE + """
local idx = ARGV[1]
local s = redis.call('HGET', KEYS[2], idx)
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[2], idx, ARGV[2])
redis.call('HSET', KEYS[3], idx, ARGV[3])
redis.call('HINCRBY', KEYS[1], s, -1)
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('ZREM', KEYS[8], ARGV[5])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[6])
settle(ARGV[4])
return 1
"""

# ARGV[1] now.
# Queued requests become cancelled; the job is cancelling while a request
# still runs, else cancelled. Returns the job's status, or nil.
CANCEL = _SETTLE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return nil end
if st == 'completed' or st == 'cancelled' then return st end
local states = redis.call('HGETALL', KEYS[2])
local n = 0
for i = 1, #states, 2 do
  if states[i + 1] == 'queued' then
    redis.call('HSET', KEYS[2], states[i], 'cancelled')
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[1], 'queued', 0 - n)
  redis.call('HINCRBY', KEYS[1], 'cancelled', n)
end
redis.call('HSET', KEYS[1], 'status', 'cancelling')
settle(ARGV[1])
return redis.call('HGET', KEYS[1], 'status')
"""

# ARGV[1] index, ARGV[2] now, ARGV[3] lease member, ARGV[4] '1' to release a
# request this worker holds (it is shutting down) rather than a lapsed one.
# The request goes back to queued (1; the caller sends it again) or, in a
# cancelling job, ends cancelled (2). 0: the lease was renewed or is gone.
REQUEUE = _SETTLE + """
local lapses = redis.call('ZSCORE', KEYS[8], ARGV[3])
if not lapses then return 0 end
if ARGV[4] ~= '1' and tonumber(lapses) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[8], ARGV[3])
local idx = ARGV[1]
if redis.call('HGET', KEYS[2], idx) ~= 'running' then return 0 end
redis.call('HINCRBY', KEYS[1], 'running', -1)
if redis.call('HGET', KEYS[1], 'status') == 'cancelling' then
  redis.call('HSET', KEYS[2], idx, 'cancelled')
  redis.call('HINCRBY', KEYS[1], 'cancelled', 1)
  settle(ARGV[2])
  return 2
end
redis.call('HSET', KEYS[2], idx, 'queued')
redis.call('HINCRBY', KEYS[1], 'queued', 1)
return 1
"""

# ARGV[1] retention seconds.
# Failed requests go back to queued, except those whose input was invalid
# (they would fail again). Returns their indices.
RETRY = """
if not redis.call('HGET', KEYS[1], 'status') then return nil end
local states = redis.call('HGETALL', KEYS[2])
local out = {}
for i = 1, #states, 2 do
  if states[i + 1] == 'failed' then
    local line = cjson.decode(redis.call('HGET', KEYS[3], states[i]))
    if type(line.error) ~= 'table' or line.error.code ~= 'invalid_request' then
      redis.call('HSET', KEYS[2], states[i], 'queued')
      redis.call('HDEL', KEYS[3], states[i])
      redis.call('HDEL', KEYS[7], states[i])
      table.insert(out, states[i])
    end
  end
end
if #out > 0 then
  redis.call('HINCRBY', KEYS[1], 'failed', 0 - #out)
  redis.call('HINCRBY', KEYS[1], 'queued', #out)
  local st = redis.call('HGET', KEYS[1], 'status')
  if st == 'completed' or st == 'cancelled' then
    redis.call('HSET', KEYS[1], 'status', 'queued')
    redis.call('HDEL', KEYS[1], 'finished_at')
  end
  for i = 1, 7 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
return out
"""


# Claim the jobs whose sender's claim has run out (score <= now): push their
# deadline to ARGV[2], so that one caller at a time sends for each.
# KEYS: unsent set. ARGV: now, new deadline, limit.
CLAIM_UNSENT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
end
return ids
"""
