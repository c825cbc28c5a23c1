-- require "resty.http": an HTTP/1.1 client over cosockets, with the API of lua-resty-http for
-- its common use: new, connect, set_timeout(s), request, request_uri, read_body, body_reader,
-- set_keepalive, get_reused_times, close. Bodies may be sized, chunked or read until close.
-- https goes through the cosockets' sslhandshake: the certificate is verified unless
-- ssl_verify is false.

local tcp = ngx.socket.tcp
local encode_args = ngx.encode_args
local lower, upper, find, match, sub, format = string.lower, string.upper, string.find, string.match, string.sub, string.format
local concat, insert = table.concat, table.insert
local tonumber, tostring, type, pairs, ipairs, setmetatable, rawget, rawset =
    tonumber, tostring, type, pairs, ipairs, setmetatable, rawget, rawset

local DEFAULT_CHUNK = 65536

local http = { _VERSION = "0.17.2" }
local client = {}
client.__index = client
-- Shared by every tenant's clients: never handed out.
client.__metatable = false

-- Response headers: looked up by any case, kept with the case the server sent.
local function new_headers()
    local names = {}
    return setmetatable({}, {
        __index = function(t, name)
            if type(name) == "string" then
                local original = names[lower(name)]
                if original then
                    return rawget(t, original)
                end
            end
            return nil
        end,
        __newindex = function(t, name, value)
            local key = lower(name)
            local original = names[key]
            if original == nil then
                names[key] = name
                original = name
            end
            rawset(t, original, value)
        end,
    })
end

local function has_header(headers, name)
    for key in pairs(headers) do
        if lower(key) == name then
            return true
        end
    end
    return false
end

function http.new()
    return setmetatable({ sock = tcp(), keepalive = true, unread = false }, client)
end

function client:set_timeout(ms)
    self.sock:settimeout(ms)
end

function client:set_timeouts(connect, send, read)
    self.sock:settimeouts(connect, send, read)
end

-- connect(host, port[, options]) or
-- connect{ scheme = , host = , port = , pool = , ssl_server_name = , ssl_verify = }
function client:connect(host, port, options)
    local scheme, server_name, verify = "http", nil, true
    if type(host) == "table" then
        local o = host
        scheme, host, port = lower(o.scheme or "http"), o.host, o.port
        server_name, verify = o.ssl_server_name, o.ssl_verify ~= false
        options = { pool = o.pool }
    end
    if scheme ~= "http" and scheme ~= "https" then
        return nil, "unsupported scheme: " .. tostring(scheme)
    end
    if type(host) ~= "string" then
        return nil, "host expected"
    end
    local tls = scheme == "https"
    port = tonumber(port) or (tls and 443 or 80)
    server_name = server_name or host
    if tls and not (options and options.pool) then
        -- TLS connections never share a pool with plain ones, nor across names or verification.
        options = { pool = format("%s:%d:%s:%s", host, port, server_name, tostring(verify)) }
    end
    self.host, self.port, self.scheme = host, port, scheme
    local ok, err = self.sock:connect(host, port, options)
    if not ok then
        return nil, err
    end
    if tls then
        local done, err2 = self.sock:sslhandshake(nil, server_name, verify)
        if not done then
            return nil, err2
        end
    end
    self.keepalive, self.unread = true, false
    return true
end

function client:parse_uri(uri)
    local scheme, rest = match(uri, "^(%a[%w+.-]*)://(.*)$")
    if not scheme then
        return nil, "bad uri: " .. tostring(uri)
    end
    scheme = lower(scheme)
    local authority, path = match(rest, "^([^/?#]*)(.*)$")
    local host, port = match(authority, "^%[([^%]]+)%]:?(%d*)$")
    if not host then
        host, port = match(authority, "^([^:]*):?(%d*)$")
    end
    if not host or host == "" then
        return nil, "bad uri: " .. uri
    end
    port = tonumber(port) or (scheme == "https" and 443 or 80)
    path = match(path, "^([^#]*)")
    local query
    local q = find(path, "?", 1, true)
    if q then
        path, query = sub(path, 1, q - 1), sub(path, q + 1)
    end
    if path == "" then
        path = "/"
    end
    return { scheme, host, port, path, query }
end

local function chunked_reader(sock)
    local done = false
    return function()
        if done then
            return nil
        end
        local line, err = sock:receive("*l")
        if not line then
            return nil, err
        end
        local size = tonumber(match(line, "^%s*(%x+)"), 16)
        if not size then
            return nil, "bad chunk size: " .. line
        end
        if size == 0 then
            repeat
                line, err = sock:receive("*l")
                if not line then
                    return nil, err
                end
            until line == ""
            done = true
            return nil
        end
        local data, err2 = sock:receive(size)
        if not data then
            return nil, err2
        end
        local crlf, err3 = sock:receive("*l")
        if crlf ~= "" then
            return nil, err3 or "bad chunk terminator"
        end
        return data
    end
end

local function sized_reader(sock, length)
    local left = length
    return function(max)
        if left <= 0 then
            return nil
        end
        local size = math.min(left, max or DEFAULT_CHUNK)
        local data, err = sock:receive(size)
        if not data then
            return nil, err
        end
        left = left - #data
        return data
    end
end

local function until_close_reader(sock)
    local done = false
    return function(max)
        if done then
            return nil
        end
        local data, err = sock:receiveany(max or DEFAULT_CHUNK)
        if not data then
            if err == "closed" then
                done = true
                return nil
            end
            return nil, err
        end
        return data
    end
end

local function read_body(res)
    local reader = res.body_reader
    if not reader then
        return ""
    end
    local parts = {}
    while true do
        local data, err = reader()
        if err then
            return nil, err
        end
        if not data then
            break
        end
        insert(parts, data)
    end
    return concat(parts)
end

-- request{ method = , path = , query = , headers = , body = , version = }
function client:request(params)
    local sock = self.sock
    local method = upper(params.method or "GET")
    local path = params.path or "/"
    local query = params.query
    if type(query) == "table" then
        query = encode_args(query)
    end
    if query and query ~= "" then
        path = path .. "?" .. query
    end
    local headers = {}
    for name, value in pairs(params.headers or {}) do
        headers[name] = value
    end
    if not has_header(headers, "host") then
        local host = self.host or "localhost"
        local default_port = self.scheme == "https" and 443 or 80
        headers["Host"] = (self.port == nil or self.port == default_port) and host or (host .. ":" .. self.port)
    end
    if not has_header(headers, "user-agent") then
        headers["User-Agent"] = "tidegate-resty-http/" .. http._VERSION
    end
    local body = params.body
    if type(body) == "table" then
        body = concat(body)
    elseif body ~= nil and type(body) ~= "string" then
        return nil, "body must be a string or an array of strings"
    end
    if body and not has_header(headers, "content-length") and not has_header(headers, "transfer-encoding") then
        headers["Content-Length"] = #body
    elseif not body and (method == "POST" or method == "PUT" or method == "PATCH")
        and not has_header(headers, "content-length") then
        headers["Content-Length"] = 0
    end
    local out = { method, " ", path, params.version == 1.0 and " HTTP/1.0\r\n" or " HTTP/1.1\r\n" }
    for name, value in pairs(headers) do
        if type(value) == "table" then
            for _, each in ipairs(value) do
                insert(out, format("%s: %s\r\n", name, tostring(each)))
            end
        else
            insert(out, format("%s: %s\r\n", name, tostring(value)))
        end
    end
    insert(out, "\r\n")
    if body then
        insert(out, body)
    end
    local sent, err = sock:send(out)
    if not sent then
        return nil, err
    end

    local version, status, reason, res_headers
    repeat
        local line, err2 = sock:receive("*l")
        if not line then
            return nil, err2
        end
        version, status, reason = match(line, "^HTTP/(%d%.%d) (%d%d%d) ?(.*)$")
        if not status then
            return nil, "bad status line: " .. line
        end
        status = tonumber(status)
        res_headers = new_headers()
        while true do
            local header, err3 = sock:receive("*l")
            if not header then
                return nil, err3
            end
            if header == "" then
                break
            end
            local name, value = match(header, "^([^:]+):%s*(.-)%s*$")
            if name then
                local seen = res_headers[name]
                if seen == nil then
                    res_headers[name] = value
                elseif type(seen) == "table" then
                    insert(seen, value)
                else
                    res_headers[name] = { seen, value }
                end
            end
        end
    until status >= 200 or status == 101

    local connection = lower(tostring(res_headers["Connection"] or ""))
    self.keepalive = not find(connection, "close", 1, true)
        and (version == "1.1" or find(connection, "keep-alive", 1, true) ~= nil)
    local has_body = method ~= "HEAD" and status ~= 204 and status ~= 304 and status >= 200
    local res = { status = status, reason = reason, headers = res_headers, has_body = has_body, read_body = read_body }
    if has_body then
        local encoding = lower(tostring(res_headers["Transfer-Encoding"] or ""))
        local length = tonumber(res_headers["Content-Length"])
        local reader
        if find(encoding, "chunked", 1, true) then
            reader = chunked_reader(sock)
        elseif length then
            reader = sized_reader(sock, length)
        else
            reader = until_close_reader(sock)
            self.keepalive = false
        end
        self.unread = true
        res.body_reader = function(max)
            local data, err4 = reader(max)
            if data == nil then
                self.unread = false
            end
            return data, err4
        end
    end
    return res
end

function client:request_uri(uri, params)
    params = params or {}
    local parsed, err = self:parse_uri(uri)
    if not parsed then
        return nil, err
    end
    local scheme, host, port, path, query = parsed[1], parsed[2], parsed[3], parsed[4], parsed[5]
    local ok, err2 = self:connect({
        scheme = scheme,
        host = host,
        port = port,
        pool = params.keepalive_pool,
        ssl_server_name = params.ssl_server_name,
        ssl_verify = params.ssl_verify,
    })
    if not ok then
        return nil, err2
    end
    local request = {}
    for k, v in pairs(params) do
        request[k] = v
    end
    request.path = params.path or path
    request.query = params.query or query
    local res, err3 = self:request(request)
    if not res then
        self:close()
        return nil, err3
    end
    local body, err4 = res:read_body()
    if not body then
        self:close()
        return nil, err4
    end
    res.body = body
    if params.keepalive == false then
        self:close()
    else
        self:set_keepalive(params.keepalive_timeout, params.keepalive_pool_size)
    end
    return res
end

function client:set_keepalive(timeout, size)
    if not self.keepalive or self.unread then
        self.sock:close()
        return 1
    end
    return self.sock:setkeepalive(timeout, size)
end

function client:get_reused_times()
    return self.sock:getreusedtimes()
end

function client:close()
    return self.sock:close()
end

http.parse_uri = client.parse_uri

return http
