-- resty.lrucache, with the API of OpenResty's (whose own needs LuaJIT's FFI): a cache of Lua
-- values that holds at most `size` items and lets the least recently used one go first.
-- Items are nodes of a circular doubly linked list through a sentinel, most recently used
-- first, found by key through `hasht` (the field OpenResty's exposes too).
--
--   local c = lrucache.new(size)          -- nil, err when size < 1
--   c:set(key, value, ttl, flags)         -- ttl in seconds (none: never stale); flags: a
--                                         -- number >= 0, else 0
--   local value, stale, flags = c:get(key) -- a stale item: nil, its value, its flags (and it
--                                         -- is gone)
--   c:delete(key); c:flush_all(); c:count(); c:capacity(); c:get_keys(max, res)

local ngx_now = ngx.now
local setmetatable, type, floor = setmetatable, type, math.floor

local lrucache = { _VERSION = "0.15" }
local methods = {}
local mt = { __index = methods }

local function unlink(node)
    node.prev.next = node.next
    node.next.prev = node.prev
end

local function push_front(head, node)
    node.prev = head
    node.next = head.next
    head.next.prev = node
    head.next = node
end

-- `load_factor` (0.1 to 1, 0.5 by default) only sizes `bucket_sz`, which the pureffi variant
-- reports: the hash table here is Lua's own.
function lrucache.new(size, load_factor)
    if type(size) ~= "number" or size < 1 then
        return nil, "size too small"
    end
    size = floor(size)
    local factor = type(load_factor) == "number" and load_factor or 0.5
    factor = factor < 0.1 and 0.1 or factor > 1 and 1 or factor
    local buckets = 1
    while buckets < math.ceil(size / factor) do
        buckets = buckets * 2
    end
    local head = {}
    head.prev, head.next = head, head
    return setmetatable({ size = size, n = 0, hasht = {}, head = head, bucket_sz = buckets }, mt)
end

local function remove(self, node)
    unlink(node)
    self.hasht[node.key] = nil
    self.n = self.n - 1
end

function methods.get(self, key)
    local node = self.hasht[key]
    if node == nil then
        return nil
    end
    if node.expire and node.expire < ngx_now() then
        remove(self, node)
        return nil, node.value, node.flags
    end
    unlink(node)
    push_front(self.head, node)
    return node.value, nil, node.flags
end

function methods.set(self, key, value, ttl, flags)
    local node = self.hasht[key]
    if node then
        unlink(node)
    else
        if self.n >= self.size then
            remove(self, self.head.prev)
        end
        node = { key = key }
        self.hasht[key] = node
        self.n = self.n + 1
    end
    node.value = value
    node.expire = (type(ttl) == "number" and ttl > 0) and ngx_now() + ttl or nil
    node.flags = (type(flags) == "number" and flags >= 0) and floor(flags) or 0
    push_front(self.head, node)
end

function methods.delete(self, key)
    local node = self.hasht[key]
    if node == nil then
        return false
    end
    remove(self, node)
    return true
end

function methods.flush_all(self)
    local head = self.head
    head.prev, head.next = head, head
    self.hasht = {}
    self.n = 0
end

function methods.count(self)
    return self.n
end

function methods.capacity(self)
    return self.size
end

-- The keys, most recently used first: at most `max_count` of them (all when 0 or nil), in
-- `res` when given (what follows them in it is cleared).
function methods.get_keys(self, max_count, res)
    if not max_count or max_count == 0 then
        max_count = self.n
    end
    res = res or {}
    local i, node = 0, self.head.next
    while node ~= self.head and i < max_count do
        i = i + 1
        res[i] = node.key
        node = node.next
    end
    local j = i + 1
    while res[j] ~= nil do
        res[j] = nil
        j = j + 1
    end
    return res
end

return lrucache
