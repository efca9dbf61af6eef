"""The Lua scripts of the Redis KV-block allocator (`services.common.redis_blocks` runs them).

Each script is one atomic change of the pool. Every script but INIT and CACHE takes the pool's seven
keys first, in this order, then the owned lists of the requests it touches:

  KEYS[1] free    list of free block ids (LIFO: the head is granted first)
  KEYS[2] meta    hash: num_blocks, block_size (the pool's record of existence)
  KEYS[3] index   hash: block key -> block id (prefix caching)
  KEYS[4] keyed   hash: block id -> block key
  KEYS[5] refs    hash: keyed block id -> how many owned lists hold it
  KEYS[6] lru     sorted set: keyed blocks no list holds, scored by release order (evicted lowest first)
  KEYS[7] clock   counter for the release order
  KEYS[8..]       owned lists, `kv_owned(request_id)`

A block is in exactly one place: the free list (never keyed), one or more owned lists (keyed ones
may be in several: refs counts them), or the LRU (keyed, held by none). Without prefix caching
nothing is keyed, and the scripts do what they did before it: free list and owned lists only.
Needs Redis >= 6.2 (LPOP with a count).
"""
from __future__ import annotations

POOL_KEYS = 7

# Helpers every pool script starts with. push: ids in chunks (Lua's unpack is limited to ~8000
# values). available: blocks a request can be granted. unkey: a cached block's key and references
# dropped. take: n fresh blocks appended to `dest`, the free list first, then the least recently
# released keyed blocks, which lose their key.
_COMMON = """
local function push(cmd, key, ids)
  for i = 1, #ids, 1000 do
    redis.call(cmd, key, unpack(ids, i, math.min(i + 999, #ids)))
  end
end
local function available()
  return redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[6])
end
local function unkey(b)                -- a cached block loses its key and reference count
  local key = redis.call('HGET', KEYS[4], b)
  if key then
    redis.call('HDEL', KEYS[3], key)
  end
  redis.call('HDEL', KEYS[4], b)
  redis.call('HDEL', KEYS[5], b)
end
local function take(n, dest)
  local ids = {}
  local from_free = math.min(n, redis.call('LLEN', KEYS[1]))
  if from_free > 0 then
    ids = redis.call('LPOP', KEYS[1], from_free)
  end
  if n > from_free then
    local evicted = redis.call('ZPOPMIN', KEYS[6], n - from_free)
    for j = 1, #evicted, 2 do
      local b = evicted[j]
      unkey(b)
      ids[#ids + 1] = b
    end
  end
  if #ids > 0 then
    push('RPUSH', dest, ids)
  end
  return ids
end
"""

# KEYS: free, meta.  ARGV: num_blocks, block_size.
# Returns {1, n, size} created | {0, n, size} already there | {-1, free_len} free list without meta.
INIT = _COMMON + """
local meta = redis.call('HMGET', KEYS[2], 'num_blocks', 'block_size')
if meta[1] then
  return {0, tonumber(meta[1]), tonumber(meta[2] or 0)}
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1, redis.call('LLEN', KEYS[1])}
end
local n = tonumber(ARGV[1])
for start = 0, n - 1, 1000 do
  local ids = {}
  for id = start, math.min(start + 999, n - 1) do ids[#ids + 1] = id end
  push('RPUSH', KEYS[1], ids)
end
redis.call('HSET', KEYS[2], 'num_blocks', n, 'block_size', ARGV[2])
return {1, n, tonumber(ARGV[2])}
"""

# KEYS: the pool's seven, owned(r1), owned(r2), ...  ARGV: n1, n2, ...
# Fresh blocks, granted in order, each all or nothing, stopping at the first that does not fit.
# Returns {-1} no pool | {available_after, ids1, ids2, ...} one list per granted request.
ALLOCATE = _COMMON + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1}
end
local out = {0}
for i = 1, #ARGV do
  local n = tonumber(ARGV[i])
  if available() < n then
    break
  end
  out[#out + 1] = take(n, KEYS[i + 7])
end
out[1] = available()
return out
"""

# KEYS: the pool's seven, owned(r).  ARGV: num_blocks, key1, key2, ... (the request's reusable keys).
# The longest run of leading keys in the index is reused (reference +1, out of the LRU), the rest of
# the num_blocks are fresh; all or nothing.
# Returns {-1} no pool | {-2} the request holds blocks already | {-3, available} does not fit |
# {num_cached, id1, id2, ...} the whole table.
ALLOCATE_CACHED = _COMMON + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1}
end
if redis.call('EXISTS', KEYS[8]) == 1 then
  return {-2}
end
local n = tonumber(ARGV[1])
local hits, reclaimed = {}, 0
for i = 2, math.min(#ARGV, n + 1) do
  local b = redis.call('HGET', KEYS[3], ARGV[i])
  if not b then
    break
  end
  hits[#hits + 1] = b
  if redis.call('ZSCORE', KEYS[6], b) then
    reclaimed = reclaimed + 1
  end
end
if available() - reclaimed < n - #hits then
  return {-3, available() - reclaimed}
end
for _, b in ipairs(hits) do
  redis.call('HINCRBY', KEYS[5], b, 1)
  redis.call('ZREM', KEYS[6], b)
end
if #hits > 0 then
  push('RPUSH', KEYS[8], hits)
end
local out = {#hits}
for _, b in ipairs(hits) do out[#out + 1] = b end
for _, b in ipairs(take(n - #hits, KEYS[8])) do out[#out + 1] = b end
return out
"""

# KEYS: index, keyed, refs, owned(r).  ARGV: index1, key1, index2, key2, ... (0-based table positions).
# Keys the request's blocks at those positions, held by it alone (refs 1). A position past the table,
# a block already keyed or a key another block holds is skipped. Returns how many were keyed.
CACHE = """
local added = 0
for i = 1, #ARGV, 2 do
  local b = redis.call('LINDEX', KEYS[4], tonumber(ARGV[i]))
  if b and redis.call('HEXISTS', KEYS[2], b) == 0 and redis.call('HSETNX', KEYS[1], ARGV[i + 1], b) == 1 then
    redis.call('HSET', KEYS[2], b, ARGV[i + 1])
    redis.call('HSET', KEYS[3], b, 1)
    added = added + 1
  end
end
return added
"""

# KEYS: the pool's seven, owned(r1), owned(r2), ...   Returns how many blocks the lists held.
# A request's list is deleted as its blocks are released, so freeing twice returns 0 the second time
# and never duplicates a block. Private blocks go to the free list (the table's first block at the
# head: granted first); a keyed block loses one reference and, held by none, joins the LRU, the
# table's tail first (the tail of a prefix is evicted before its head). Without a pool (deleted
# under us) the owned lists are only dropped: a free list must not reappear without its kv_meta.
FREE = _COMMON + """
local has_pool = redis.call('EXISTS', KEYS[2]) == 1
local total = 0
for i = 8, #KEYS do
  local ids = redis.call('LRANGE', KEYS[i], 0, -1)
  if #ids > 0 then
    redis.call('DEL', KEYS[i])
    if has_pool then
      local private = {}
      for j = #ids, 1, -1 do
        local b = ids[j]
        if redis.call('HEXISTS', KEYS[4], b) == 1 then
          if redis.call('HINCRBY', KEYS[5], b, -1) <= 0 then
            redis.call('HSET', KEYS[5], b, 0)
            redis.call('ZADD', KEYS[6], redis.call('INCR', KEYS[7]), b)
          end
        else
          private[#private + 1] = b
        end
      end
      push('LPUSH', KEYS[1], private)
    end
    total = total + #ids
  end
end
return total
"""

# KEYS: the pool's seven.  Drops the keys of every cached block no request holds and puts those blocks
# on the free list (vLLM's reset_prefix_cache); keyed blocks requests hold stay as they are.
# Returns {-1} no pool | {blocks freed}.
RESET_CACHE = _COMMON + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1}
end
local ids = redis.call('ZRANGE', KEYS[6], 0, -1)
for _, b in ipairs(ids) do
  unkey(b)
end
redis.call('DEL', KEYS[6])
push('LPUSH', KEYS[1], ids)
return {#ids}
"""

# KEYS: the pool's seven.  ARGV: the SCAN pattern of every request's list (kv_owned("") + "*").
# Every block id must be in exactly one place (module docstring). Repairs what is safe, in one atomic
# step (SCAN inside the script sees every owned list as of this instant): a private id in no list goes
# back to the free list; an id both free and owned or keyed, repeated in the free list or out of range
# leaves the free list; a keyed block's references are set to the lists that hold it, and it is in
# the LRU exactly when none does; an index entry that points at a block not keyed with it is dropped.
# A private id in two requests' lists is only counted (which one holds its KV is unknowable). The owned
# lists are not declared in KEYS: a standalone Redis allows it, as it allows the non-deterministic SCAN.
# Returns {-1} no pool | {num_blocks, free, owned, owners, returned, dropped_from_free, shared,
# cached, evictable, cache_fixed}.
AUDIT = _COMMON + """
local n = tonumber(redis.call('HGET', KEYS[2], 'num_blocks') or '-1')
if n < 0 then
  return {-1}
end
local holders, owned, owners, shared = {}, 0, 0, 0
local cursor = '0'
repeat
  local reply = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do
    owners = owners + 1
    for _, id in ipairs(redis.call('LRANGE', key, 0, -1)) do
      local i = tonumber(id)
      owned = owned + 1
      holders[i] = (holders[i] or 0) + 1
    end
  end
until cursor == '0'
local keyed, cached, fixed = {}, 0, 0
local pairs_ = redis.call('HGETALL', KEYS[4])
for j = 1, #pairs_, 2 do
  local i = tonumber(pairs_[j])
  if redis.call('HGET', KEYS[3], pairs_[j + 1]) == pairs_[j] then
    keyed[i] = true
    cached = cached + 1
  else
    redis.call('HDEL', KEYS[4], pairs_[j])
    redis.call('HDEL', KEYS[5], pairs_[j])
    fixed = fixed + 1
  end
end
local index = redis.call('HGETALL', KEYS[3])
for j = 1, #index, 2 do
  if not keyed[tonumber(index[j + 1])] then
    redis.call('HDEL', KEYS[3], index[j])
    fixed = fixed + 1
  end
end
local keep, free_ids, dropped, returned = {}, {}, 0, 0
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local i = tonumber(id)
  if i == nil or i < 0 or i >= n or holders[i] or keyed[i] or free_ids[i] then
    dropped = dropped + 1
  else
    free_ids[i] = true
    keep[#keep + 1] = i
  end
end
for i = 0, n - 1 do
  local held = holders[i] or 0
  local in_lru = redis.call('ZSCORE', KEYS[6], i) ~= false
  if keyed[i] then
    if tonumber(redis.call('HGET', KEYS[5], i) or '-1') ~= held then
      redis.call('HSET', KEYS[5], i, held)
      fixed = fixed + 1
    end
    if held == 0 and not in_lru then
      redis.call('ZADD', KEYS[6], redis.call('INCR', KEYS[7]), i)
      fixed = fixed + 1
    elseif held > 0 and in_lru then
      redis.call('ZREM', KEYS[6], i)
      fixed = fixed + 1
    end
  else
    if in_lru then
      redis.call('ZREM', KEYS[6], i)
      fixed = fixed + 1
    end
    if held > 1 then
      shared = shared + 1
    elseif held == 0 and not free_ids[i] then
      keep[#keep + 1] = i
      returned = returned + 1
    end
  end
end
if dropped > 0 or returned > 0 then
  redis.call('DEL', KEYS[1])
  push('RPUSH', KEYS[1], keep)
end
return {n, #keep, owned, owners, returned, dropped, shared, cached, redis.call('ZCARD', KEYS[6]), fixed}
"""
