-- resty.limit.req: lua-resty-limit-traffic's request-rate limiter (a leaky bucket, as nginx's
-- limit_req), with its API. Upstream keeps each key's state as a C struct through LuaJIT's
-- FFI; here it is the same 16 bytes (excess and last time, unsigned 64-bit little-endian
-- integers, in milli-requests and milliseconds), packed with string.pack, in the same
-- ngx.shared dictionary, so limiters of both kinds agree on what a key holds.

local ngx_shared = ngx.shared
local ngx_now = ngx.now
local abs = math.abs
local max = math.max
local floor = math.floor
local pack = string.pack
local unpack = string.unpack
local setmetatable = setmetatable
local assert = assert
local type = type

local RECORD = "<I8I8"
local RECORD_SIZE = 16

local _M = { _VERSION = "0.09" }
local mt = { __index = _M }

function _M.new(dict_name, rate, burst)
    local dict = ngx_shared[dict_name]
    if not dict then
        return nil, "shared dict not found"
    end
    assert(rate > 0 and burst >= 0)
    return setmetatable({ dict = dict, rate = rate * 1000, burst = burst * 1000 }, mt)
end

-- The key's (excess, last), or nil and an error when the value is not a record.
local function read(dict, key)
    local value = dict:get(key)
    if value == nil then
        return nil
    end
    if type(value) ~= "string" or #value ~= RECORD_SIZE then
        return nil, "shdict abused by other users"
    end
    local excess, last = unpack(RECORD, value)
    return excess, last
end

local function write(dict, key, excess, last)
    dict:set(key, pack(RECORD, floor(excess), floor(last)))
end

function _M.incoming(self, key, commit)
    local dict = self.dict
    local rate = self.rate
    local now = ngx_now() * 1000
    local excess = 0
    local stored, last_or_err = read(dict, key)
    if stored then
        excess = max(stored - rate * abs(now - last_or_err) / 1000 + 1000, 0)
        if excess > self.burst then
            return nil, "rejected"
        end
    elseif last_or_err then
        return nil, last_or_err
    end
    if commit then
        write(dict, key, excess, now)
    end
    return excess / rate, excess / 1000
end

function _M.uncommit(self, key)
    assert(key)
    local excess, last_or_err = read(self.dict, key)
    if not excess then
        return nil, last_or_err or "not found"
    end
    write(self.dict, key, max(excess - 1000, 0), last_or_err)
    return true
end

function _M.set_rate(self, rate)
    self.rate = rate * 1000
end

function _M.set_burst(self, burst)
    self.burst = burst * 1000
end

return _M
