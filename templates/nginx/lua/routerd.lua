-- routerd's balancer: instance lists in a shared dict, applied without a reload.
--
-- routerd pushes "<app> <host:port>,<host:port>..." lines to push() over a
-- unix socket only it can reach; every line is validated again here. The
-- same table is kept in a file that init() loads when nginx starts or
-- reloads, so a new generation never serves without backends. route() runs
-- in the access phase (503 when an app has no instance), balance() in the
-- balancer phase: round robin, moving on to the next instance on failure.

local balancer = require("ngx.balancer")

local _M = {}
local DICT = "routerd_backends"
local APP = "^[a-z0-9][a-z0-9-]*$"
local MAX_TRIES = 3

local parsed = {} -- per worker: app -> { raw = "...", peers = { {host, port}, ... } }
local next_index = {} -- per worker: app -> round-robin position

local function parse_peer(text)
    local a, b, c, d, port = text:match("^(%d+)%.(%d+)%.(%d+)%.(%d+):(%d+)$")
    local host
    if a then
        for _, octet in ipairs({ a, b, c, d }) do
            if tonumber(octet) > 255 then
                return nil
            end
        end
        host = a .. "." .. b .. "." .. c .. "." .. d
    else
        host, port = text:match("^(%[[%x:%.]+%]):(%d+)$")
    end
    port = tonumber(port)
    if not host or not port or port < 1 or port > 65535 then
        return nil
    end
    return { host, port }
end

local function parse_peers(raw)
    local peers = {}
    for item in raw:gmatch("[^,]+") do
        local peer = parse_peer(item)
        if not peer then
            return nil, "bad instance " .. item
        end
        peers[#peers + 1] = peer
    end
    return peers
end

-- Validate every line first; apply only a body that is valid as a whole.
local function apply(body)
    local dict = ngx.shared[DICT]
    local head = body:match("^([^\n]*)") or ""
    local revision, mode = head:match("^revision (%d+)(.*)$")
    if not revision or (mode ~= "" and mode ~= " full") then
        return nil, "first line must be 'revision <n> [full]'"
    end
    local full = mode == " full"
    local entries = {}
    for line in body:gmatch("[^\n]+") do
        local app, raw = line:match("^(%S+) ?(%S*)$")
        if line ~= head then
            if not app or #app > 63 or not app:match(APP) then
                return nil, "bad line " .. line:sub(1, 80)
            end
            local peers, err = parse_peers(raw)
            if not peers then
                return nil, app .. ": " .. err
            end
            entries[app] = raw
        end
    end
    if full then
        for _, key in ipairs(dict:get_keys(0)) do
            if key:sub(1, 4) == "app:" and not entries[key:sub(5)] then
                dict:delete(key)
            end
        end
    end
    for app, raw in pairs(entries) do
        local ok, err = dict:safe_set("app:" .. app, raw)
        if not ok then
            return nil, "shared dict " .. DICT .. ": " .. err
        end
    end
    dict:set("revision", tonumber(revision))
    return tonumber(revision)
end

function _M.init(path)
    local dict = ngx.shared[DICT]
    local file = io.open(path, "r")
    if not file then
        return
    end
    local body = file:read("*a")
    file:close()
    local revision = tonumber(body:match("^revision (%d+)"))
    if revision and revision > (dict:get("revision") or -1) then
        local ok, err = apply(body)
        if not ok then
            ngx.log(ngx.ERR, "routerd: ignoring ", path, ": ", err)
        end
    end
end

function _M.push()
    if ngx.req.get_method() == "GET" then
        ngx.say("revision ", ngx.shared[DICT]:get("revision") or 0)
        return
    end
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if not body then
        local file = ngx.req.get_body_file()
        if file then
            local handle = io.open(file, "r")
            body = handle:read("*a")
            handle:close()
        end
    end
    local revision, err = apply(body or "")
    if not revision then
        ngx.status = 400
        ngx.say("rejected: ", err)
        return
    end
    ngx.say("revision ", revision)
end

local function peers_of(app)
    local raw = ngx.shared[DICT]:get("app:" .. app)
    if not raw or raw == "" then
        return nil
    end
    local cached = parsed[app]
    if cached and cached.raw == raw then
        return cached.peers
    end
    local peers = parse_peers(raw)
    parsed[app] = { raw = raw, peers = peers }
    return peers
end

function _M.route()
    local app = ngx.var.routerd_app
    local peers = peers_of(app)
    if not peers or #peers == 0 then
        ngx.status = 503
        ngx.header["Content-Type"] = "text/plain"
        ngx.say("No instance of this app is running.")
        return ngx.exit(503)
    end
    local index = (next_index[app] or 0) % #peers + 1
    next_index[app] = index
    ngx.ctx.routerd = { peers = peers, index = index, tries = 0 }
end

function _M.balance()
    local state = ngx.ctx.routerd
    if not state then
        return ngx.exit(500)
    end
    local peers = state.peers
    if state.tries == 0 then
        local more = math.min(#peers, MAX_TRIES) - 1
        if more > 0 then
            balancer.set_more_tries(more)
        end
    else
        state.index = state.index % #peers + 1
    end
    state.tries = state.tries + 1
    local peer = peers[state.index]
    local ok, err = balancer.set_current_peer(peer[1], peer[2])
    if not ok then
        ngx.log(ngx.ERR, "routerd: set_current_peer ", peer[1], ":", peer[2], ": ", err)
        return ngx.exit(502)
    end
end

return _M
