#!lua name=p2ptrain
-- In-database gradient accumulation for Redis servers that cannot load the p2ptrain module.
-- Same commands and replies as the module (P2P.ACCUM / P2P.MEAN), at Lua speed: the fallback,
-- and SPIRT's original approach, kept as a baseline for bench/accumulate.py.

local CHUNK = 4000  -- floats per struct call, under Lua's stack limit

local function floats(blob, n, offset)
  local fmt = '<' .. string.rep('f', n)
  return { struct.unpack(fmt, blob, offset) }
end

local function pack(values, first, last)
  return struct.pack('<' .. string.rep('f', last - first + 1), unpack(values, first, last))
end

local function add(keys, args)
  local acc, meta = keys[1], keys[2]
  local part, weight, blob = args[1], tonumber(args[2]), args[3]
  if weight == nil or weight ~= weight or weight <= 0 or weight == math.huge then
    return redis.error_reply('ERR weight must be a finite positive number')
  end
  local len = string.len(blob)
  if len % 4 ~= 0 then
    return redis.error_reply('ERR blob length ' .. len .. ' is not a multiple of 4')
  end
  local n = len / 4
  local current = redis.call('GET', acc)
  if current and string.len(current) ~= len then
    return redis.error_reply('ERR shape mismatch: accumulator has ' .. (string.len(current) / 4) .. ' floats, got ' .. n)
  end
  if redis.call('HEXISTS', meta, part) == 1 then
    return 0
  end
  local out = {}
  for first = 1, n, CHUNK do
    local count = math.min(CHUNK, n - first + 1)
    local offset = (first - 1) * 4 + 1
    local g = floats(blob, count, offset)
    local a = current and floats(current, count, offset) or nil
    for i = 1, count do
      local v = g[i]
      if v ~= v or v == math.huge or v == -math.huge then
        return redis.error_reply('ERR blob has non-finite values')
      end
      g[i] = (a and a[i] or 0) + weight * v
    end
    out[#out + 1] = pack(g, 1, count)
  end
  redis.call('SET', acc, table.concat(out))
  redis.call('HSET', meta, part, args[2])
  redis.call('HINCRBYFLOAT', meta, '~weight', args[2])
  redis.call('HINCRBY', meta, '~parts', 1)
  return 1
end

local function mean(keys, args)
  local acc, meta = keys[1], keys[2]
  local current = redis.call('GET', acc)
  if not current then
    return false
  end
  local total = tonumber(redis.call('HGET', meta, '~weight'))
  local parts = tonumber(redis.call('HGET', meta, '~parts'))
  local n = string.len(current) / 4
  local out = {}
  for first = 1, n, CHUNK do
    local count = math.min(CHUNK, n - first + 1)
    local a = floats(current, count, (first - 1) * 4 + 1)
    for i = 1, count do
      a[i] = a[i] / total
    end
    out[#out + 1] = pack(a, 1, count)
  end
  return { table.concat(out), tostring(total), parts }
end

redis.register_function('p2p_accum', add)
redis.register_function{function_name = 'p2p_mean', callback = mean, flags = {'no-writes'}}
