"""The Lua scripts of the Redis job store (:mod:`wanlite.server.redis_store`): every state change
that must be atomic (enqueue with the bound, claim, finish, cancel, touch, requeue) is one
script, so no two processes ever see a half-done change.  Keys are passed in; the consumer
group is ``workers``.
"""

ENQUEUE = """
if redis.call('SCARD', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then
  return -1
end
local seqs = {}
for i = 2, #ARGV do
  local row = cjson.decode(ARGV[i])
  local seq = redis.call('INCR', KEYS[2])
  row['seq'] = tostring(seq)
  local flat = {}
  for k, v in pairs(row) do flat[#flat + 1] = k; flat[#flat + 1] = v end
  redis.call('HSET', KEYS[5] .. row['id'], unpack(flat))
  redis.call('ZADD', KEYS[3], seq, row['id'])
  redis.call('SADD', KEYS[1], row['id'])
  redis.call('XADD', KEYS[4], '*', 'id', row['id'])
  seqs[#seqs + 1] = seq
end
return seqs
"""

# KEYS: gen hash, queued set; ARGV: started_at, seed, consumer, entry id
CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'processing', 'started_at', ARGV[1], 'seed', ARGV[2],
           'step', '0', 'worker', ARGV[3], 'entry', ARGV[4])
redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# KEYS: gen hash, finished zset, stream; ARGV: status, completed_at, result_file, error, metrics,
# consumer (only its job is finished; '' = whoever runs it)
FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[6] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'completed_at', ARGV[2], 'result_file', ARGV[3],
           'error_message', ARGV[4], 'metrics', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], redis.call('HGET', KEYS[1], 'id'))
if entry then
  redis.call('XACK', KEYS[3], 'workers', entry)
  redis.call('XDEL', KEYS[3], entry)
end
return 1
"""

# KEYS: gen hash, queued set, finished zset; ARGV: now
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancel_requested', '1',
             'error_message', 'cancelled by request', 'completed_at', ARGV[1])
  redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
  redis.call('ZADD', KEYS[3], ARGV[1], redis.call('HGET', KEYS[1], 'id'))
  return 'cancelled'
end
if status == 'processing' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'requested'
end
return 'terminal'
"""

# KEYS: gen hash, stream; ARGV: consumer
TOUCH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
if not entry then return 0 end
redis.call('XCLAIM', KEYS[2], 'workers', ARGV[1], 0, entry, 'JUSTID')
return 1
"""

# KEYS: gen hash, queued set, stream; ARGV: consumer, seed ('' = pick again), idle ms
REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'started_at', '', 'step', '0', 'seed', ARGV[2])
redis.call('HDEL', KEYS[1], 'worker')
redis.call('SADD', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then
  local p = redis.call('XPENDING', KEYS[3], 'workers', entry, entry, 1)
  local n = 0
  if p[1] then n = math.max(tonumber(p[1][4]) - 1, 0) end
  redis.call('XCLAIM', KEYS[3], 'workers', ARGV[1], 0, entry, 'IDLE', ARGV[3], 'RETRYCOUNT', n,
             'JUSTID')
end
return 1
"""
