#!lua name=p2ptrain
-- In-database gradient accumulation and model update for Redis servers that cannot load the
-- p2ptrain module. Same commands, key layouts and replies as the module (P2P.ACCUM / P2P.MEAN /
-- P2P.MEANSTORE / P2P.SGD / P2P.ADAM), at Lua speed: the fallback, and SPIRT's original approach,
-- kept as a baseline for bench/accumulate.py. Lua computes in double precision and rounds to float32 on store.

local CHUNK = 4000  -- floats per struct call, under Lua's stack limit

local function floats(blob, n, offset)
  local fmt = '<' .. string.rep('f', n)
  return { struct.unpack(fmt, blob, offset) }
end

local function pack(values, first, last)
  return struct.pack('<' .. string.rep('f', last - first + 1), unpack(values, first, last))
end

local function finite(x)
  return x == x and x ~= math.huge and x ~= -math.huge
end

local function ttl_arg(args, fixed)
  if #args == fixed then return 0 end
  local seconds = tonumber(args[fixed + 2])
  if #args ~= fixed + 2 or string.lower(args[fixed + 1]) ~= 'ex' or seconds == nil or seconds <= 0
      or seconds ~= math.floor(seconds) or seconds > 100000000 then
    return nil, redis.error_reply('ERR expected an optional `EX seconds` (a positive integer) at the end')
  end
  return seconds
end

local function expire_both(acc, meta, ttl)
  if ttl > 0 then
    redis.call('EXPIRE', acc, ttl)
    redis.call('EXPIRE', meta, ttl)
  end
end

-- P2P.ACCUM acc meta part weight blob [EX seconds]: with EX both keys get that TTL, also when the
-- part was already added.
local function add(keys, args)
  local acc, meta = keys[1], keys[2]
  local part, weight, blob = args[1], tonumber(args[2]), args[3]
  local ttl, bad_ttl = ttl_arg(args, 3)
  if ttl == nil then
    return bad_ttl
  end
  if weight == nil or not finite(weight) or weight <= 0 then
    return redis.error_reply('ERR weight must be a finite positive number')
  end
  local len = string.len(blob)
  if len == 0 or len % 4 ~= 0 then
    return redis.error_reply('ERR blob length ' .. len .. ' is not a positive multiple of 4 (float32)')
  end
  local n = len / 4
  local current = redis.call('GET', acc)
  if current and string.len(current) ~= len then
    return redis.error_reply('ERR shape mismatch: accumulator has ' .. (string.len(current) / 4) .. ' floats, got ' .. n)
  end
  if redis.call('HEXISTS', meta, part) == 1 then
    expire_both(acc, meta, ttl)
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
  expire_both(acc, meta, ttl)
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

-- Model update (SPIRT's AI.ModelUpdate). Models are p2ptrain wire tensors: a 16-byte header
-- (magic P2PT, version 1, dtype 1 = float32, compression 0, pad, u64 element count) then float32.

local function number_arg(value, name, valid, expected)
  local x = tonumber(value)
  if x == nil or not finite(x) or not valid(x) then
    return nil, redis.error_reply('ERR ' .. name .. ' must be ' .. expected)
  end
  return x
end

local function flag_arg(value, name, expected)
  if value == '0' then return 0 end
  if value == '1' then return 1 end
  return nil, redis.error_reply('ERR ' .. name .. ' must be ' .. expected)
end

local function model_header(n)
  local count = {}
  for i = 0, 7 do
    count[#count + 1] = string.char(math.floor(n / 256 ^ i) % 256)
  end
  return 'P2PT\1\1\0\0' .. table.concat(count)
end

-- The gradient blob: a positive multiple of 4 bytes of finite float32, checked before any write.
local function gradient_arg(blob)
  local len = string.len(blob)
  if len == 0 or len % 4 ~= 0 then
    return nil, redis.error_reply('ERR blob length is not a positive multiple of 4 (float32)')
  end
  local n = len / 4
  for first = 1, n, CHUNK do
    local g = floats(blob, math.min(CHUNK, n - first + 1), (first - 1) * 4 + 1)
    for i = 1, #g do
      if not finite(g[i]) then
        return nil, redis.error_reply('ERR blob has non-finite values')
      end
    end
  end
  return n
end

-- The source model of n floats, checked as the module checks it.
local function source_model(key, n)
  local model = redis.call('GET', key)
  if not model then
    return nil, redis.error_reply('ERR model ' .. key .. ' does not exist')
  end
  if string.len(model) ~= 16 + 4 * n or string.sub(model, 1, 16) ~= model_header(n) then
    return nil, redis.error_reply('ERR model ' .. key .. ' is not an uncompressed float32 p2ptrain tensor of '
      .. n .. ' elements (the gradient\'s length)')
  end
  return model
end

local function state_value(key, bytes, n)
  local state = redis.call('GET', key)
  if state and string.len(state) ~= bytes then
    return nil, redis.error_reply('ERR optimizer state ' .. key .. ' has ' .. string.len(state)
      .. ' bytes, expected ' .. bytes .. ' for ' .. n .. ' parameters')
  end
  return state or false
end

-- An optional fourth key, REUSE's old version: removed with the step (the module writes into it).
local function reuse_error(keys)
  local old = keys[4]
  if old and (old == keys[1] or old == keys[2] or old == keys[3]) then
    return redis.error_reply("ERR REUSE's key must differ from the others")
  end
end

local function store(keys, model, state, ttl)
  if keys[4] then redis.call('DEL', keys[4]) end
  redis.call('SET', keys[2], model)
  if state then redis.call('SET', keys[3], state) end
  if ttl > 0 then
    redis.call('EXPIRE', keys[2], ttl)
    if state then redis.call('EXPIRE', keys[3], ttl) end
  end
end

local function sgd(keys, args)
  local src, dst, buf_key = keys[1], keys[2], keys[3]
  local lr, momentum, dampening, decay, nesterov, ttl, n, model, buf, err
  err = reuse_error(keys)
  if err then return err end
  lr, err = number_arg(args[2], 'lr', function(x) return x >= 0 end, 'a finite number >= 0')
  if err then return err end
  momentum, err = number_arg(args[3], 'momentum', function(x) return x >= 0 end, 'a finite number >= 0')
  if err then return err end
  dampening, err = number_arg(args[4], 'dampening', function(x) return x >= 0 and x <= 1 end, 'a number in [0, 1]')
  if err then return err end
  decay, err = number_arg(args[5], 'weight_decay', function(x) return x >= 0 end, 'a finite number >= 0')
  if err then return err end
  nesterov, err = flag_arg(args[6], 'nesterov', '0 or 1')
  if err then return err end
  if nesterov == 1 and (momentum <= 0 or dampening ~= 0) then
    return redis.error_reply('ERR nesterov must be 0 unless momentum > 0 and dampening = 0 (as in torch)')
  end
  ttl, err = ttl_arg(args, 6)
  if err then return err end
  if momentum ~= 0 and (buf_key == src or buf_key == dst) then
    return redis.error_reply('ERR the momentum buffer key must differ from the model keys')
  end
  n, err = gradient_arg(args[1])
  if err then return err end
  model, err = source_model(src, n)
  if err then return err end
  if momentum ~= 0 then
    buf, err = state_value(buf_key, 4 * n, n)
    if err then return err end
  end
  if dst ~= src and redis.call('EXISTS', dst) == 1 then
    return 0  -- this version was already stepped to: a retry changes nothing
  end
  local out, out_buf = {}, {}
  for first = 1, n, CHUNK do
    local count = math.min(CHUNK, n - first + 1)
    local offset = (first - 1) * 4 + 1
    local g, p = floats(args[1], count, offset), floats(model, count, offset + 16)
    local b = buf and floats(buf, count, offset) or nil
    for i = 1, count do
      local d = g[i] + decay * p[i]
      if momentum ~= 0 then
        local v = b and (b[i] * momentum + (1 - dampening) * d) or d
        g[i] = v
        if nesterov == 1 then d = d + momentum * v else d = v end
      end
      p[i] = p[i] - lr * d
    end
    out[#out + 1] = pack(p, 1, count)
    out_buf[#out_buf + 1] = pack(g, 1, count)
  end
  store(keys, model_header(n) .. table.concat(out), momentum ~= 0 and table.concat(out_buf), ttl)
  return 1
end

local function adam(keys, args)
  local src, dst, state_key = keys[1], keys[2], keys[3]
  local lr, beta1, beta2, eps, decay, decoupled, ttl, n, model, state, err
  err = reuse_error(keys)
  if err then return err end
  lr, err = number_arg(args[2], 'lr', function(x) return x >= 0 end, 'a finite number >= 0')
  if err then return err end
  beta1, err = number_arg(args[3], 'beta1', function(x) return x >= 0 and x < 1 end, 'in [0, 1)')
  if err then return err end
  beta2, err = number_arg(args[4], 'beta2', function(x) return x >= 0 and x < 1 end, 'in [0, 1)')
  if err then return err end
  eps, err = number_arg(args[5], 'eps', function(x) return x > 0 end, 'a finite number > 0')
  if err then return err end
  decay, err = number_arg(args[6], 'weight_decay', function(x) return x >= 0 end, 'a finite number >= 0')
  if err then return err end
  decoupled, err = flag_arg(args[7], 'decoupled', '0 (Adam) or 1 (AdamW)')
  if err then return err end
  ttl, err = ttl_arg(args, 7)
  if err then return err end
  if state_key == src or state_key == dst then
    return redis.error_reply('ERR the optimizer state key must differ from the model keys')
  end
  n, err = gradient_arg(args[1])
  if err then return err end
  state, err = state_value(state_key, 16 + 8 * n, n)
  if err then return err end
  local step = 0
  if state then
    step = struct.unpack('<d', state, 9)
    if string.sub(state, 1, 4) ~= 'P2PA' or not (step >= 1) or step ~= math.floor(step) then
      return redis.error_reply('ERR optimizer state ' .. state_key .. ' is not a P2P.ADAM state')
    end
  end
  model, err = source_model(src, n)
  if err then return err end
  if dst ~= src and redis.call('EXISTS', dst) == 1 then
    return 0
  end
  step = step + 1
  local step_size = lr / (1 - beta1 ^ step)
  local bias2_sqrt = math.sqrt(1 - beta2 ^ step)
  local shrink = decoupled == 1 and (1 - lr * decay) or 1
  local coupled = decoupled == 1 and 0 or decay
  local out, out_m, out_v = {}, {}, {}
  for first = 1, n, CHUNK do
    local count = math.min(CHUNK, n - first + 1)
    local offset = (first - 1) * 4 + 1
    local g, p = floats(args[1], count, offset), floats(model, count, offset + 16)
    local m = state and floats(state, count, offset + 16) or nil
    local v = state and floats(state, count, offset + 16 + 4 * n) or nil
    local new_m, new_v = {}, {}
    for i = 1, count do
      local d = g[i] + coupled * p[i]
      local mi, vi = m and m[i] or 0, v and v[i] or 0
      mi = mi + (1 - beta1) * (d - mi)
      vi = vi * beta2 + (1 - beta2) * d * d
      new_m[i], new_v[i] = mi, vi
      p[i] = p[i] * shrink - step_size * mi / (math.sqrt(vi) / bias2_sqrt + eps)
    end
    out[#out + 1] = pack(p, 1, count)
    out_m[#out_m + 1] = pack(new_m, 1, count)
    out_v[#out_v + 1] = pack(new_v, 1, count)
  end
  local header = 'P2PA\0\0\0\0' .. struct.pack('<d', step)
  store(keys, model_header(n) .. table.concat(out), header .. table.concat(out_m) .. table.concat(out_v), ttl)
  return 1
end

-- P2P.MEANSTORE acc meta dst [EX seconds]: P2P.MEAN's reply, the mean also written to dst as a wire
-- tensor (replacing any string there). Nothing is written when nothing was accumulated.
local function mean_store(keys, args)
  local ttl, bad_ttl = ttl_arg(args, 0)
  if ttl == nil then
    return bad_ttl
  end
  local dst = keys[3]
  if dst == keys[1] or dst == keys[2] then
    return redis.error_reply("ERR dst must differ from the accumulator's keys")
  end
  local reply = mean(keys, args)
  if not reply then
    return reply
  end
  local kind = redis.call('TYPE', dst)['ok']
  if kind ~= 'none' and kind ~= 'string' then
    return redis.error_reply('WRONGTYPE ' .. dst .. ' is not a string')
  end
  local value = model_header(string.len(reply[1]) / 4) .. reply[1]
  if ttl > 0 then
    redis.call('SET', dst, value, 'EX', ttl)
  else
    redis.call('SET', dst, value)
  end
  return reply
end

redis.register_function('p2p_accum', add)
redis.register_function('p2p_meanstore', mean_store)
redis.register_function('p2p_sgd', sgd)
redis.register_function('p2p_adam', adam)
redis.register_function{function_name = 'p2p_mean', callback = mean, flags = {'no-writes'}}
