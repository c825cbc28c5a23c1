-- resty.lock, with the API of OpenResty's (whose own needs LuaJIT's FFI): a nonblocking lock
-- across the workers and requests of a namespace, kept in an ngx.shared dictionary. A waiting
-- lock sleeps (the worker serves others) with a step that grows by `ratio` up to `max_step`,
-- until `timeout`; a lock nobody releases goes after `exptime`.
--
--   local lock, err = resty_lock:new(dict_name, opts)  -- opts: exptime 30, timeout 5,
--                                                      -- step 0.001, ratio 2, max_step 0.5
--   local elapsed, err = lock:lock(key)   -- 0 at once; nil, "timeout" / "locked" / ...
--   local ok, err = lock:unlock()         -- 1; nil, "unlocked"
--   local ok, err = lock:expire(seconds)  -- true; nil, "unlocked"

local ngx_shared, ngx_sleep = ngx.shared, ngx.sleep
local setmetatable, type = setmetatable, type

local lock = { _VERSION = "0.09" }
local methods = {}
local mt = { __index = methods }

function lock.new(_, dict_name, opts)
    local dict = ngx_shared[dict_name]
    if not dict then
        return nil, "dictionary not found"
    end
    opts = opts or {}
    local exptime = opts.exptime
    if exptime == nil or exptime == 0 then
        exptime = 30
    end
    local timeout = opts.timeout
    if timeout == nil then
        timeout = 5
    end
    return setmetatable({
        dict = dict,
        exptime = exptime,
        timeout = timeout,
        step = opts.step or 0.001,
        ratio = opts.ratio or 2,
        max_step = opts.max_step or 0.5,
    }, mt)
end

function methods.lock(self, key)
    if key == nil then
        return nil, "nil key"
    end
    if self.key then
        return nil, "locked"
    end
    local dict, exptime = self.dict, self.exptime
    local ok, err = dict:add(key, true, exptime)
    if ok then
        self.key = key
        return 0
    end
    if err ~= "exists" then
        return nil, err
    end
    local step, ratio, max_step = self.step, self.ratio, self.max_step
    local timeout, elapsed = self.timeout, 0
    while timeout > 0 do
        if step > timeout then
            step = timeout
        end
        ngx_sleep(step)
        elapsed = elapsed + step
        timeout = timeout - step
        ok, err = dict:add(key, true, exptime)
        if ok then
            self.key = key
            return elapsed
        end
        if err ~= "exists" then
            return nil, err
        end
        if timeout <= 0 then
            break
        end
        step = step * ratio
        if step <= 0 then
            step = 0.001
        end
        if step > max_step then
            step = max_step
        end
    end
    return nil, "timeout"
end

function methods.unlock(self)
    local key = self.key
    if key == nil then
        return nil, "unlocked"
    end
    self.key = nil
    local ok, err = self.dict:delete(key)
    if not ok then
        return nil, err
    end
    return 1
end

function methods.expire(self, time)
    local key = self.key
    if key == nil then
        return nil, "unlocked"
    end
    local ok, err = self.dict:replace(key, true, type(time) == "number" and time or self.exptime)
    if not ok then
        return nil, err
    end
    return true
end

return lock
