-- routerd's balancer: instance lists in a shared dict, applied without a reload.
--
-- routerd pushes "<app> <host:port>,<host:port>..." lines to push() over a
-- unix socket only it can reach (an instance may carry "=<weight>" when the
-- app's weights split its traffic between releases); every line is validated
-- again here, to the forms routerd itself writes, and a body is applied whole
-- or not at all. The same table is kept in a file that init() loads when
-- nginx starts or reloads, so a new generation never serves without backends.
-- route() runs in the access phase (503 when an app has no instance) and
-- picks the instance: round robin, or with weights nginx's own smooth
-- weighted round robin, so both backend modes split alike. balance() runs in
-- the balancer phase, moving on to the next instance on failure.

local balancer = require("ngx.balancer")
local ffi = require("ffi")

local _M = {}
local DICT = "routerd_backends"
local MAX_TRIES = 3
local AF_INET, AF_INET6 = 2, 10 -- Linux's numbers
local MAX_WEIGHT = 1000000 -- the largest weight routerd writes

-- inet_pton, the C library's own parser, decides what an address is.
pcall(ffi.cdef, "int inet_pton(int af, const char *src, void *dst);")
local address = ffi.new("unsigned char[16]")

-- per worker: app -> { raw = "...", peers = { {host, port, weight}, ... },
-- weighted = any weight other than 1, current = smooth round-robin state }
local parsed = {}
local next_index = {} -- per worker: app -> round-robin position

local function is_address(family, text)
    return ffi.C.inet_pton(family, text, address) == 1
end

-- A whole number 1..MAX_WEIGHT written without leading zeros, or nil.
local function parse_weight(text)
    if text:sub(1, 1) == "0" or #text > 7 or tonumber(text) > MAX_WEIGHT then
        return nil
    end
    return tonumber(text)
end

-- Only the forms routerd writes: IPv4 in dotted quads without leading zeros
-- (inet_pton refuses them too), [IPv6], and a port 1..65535 without leading
-- zeros; then, optionally, "=" and a weight.
local function parse_peer(text)
    local weight = 1
    local address, written = text:match("^(.*)=(%d+)$")
    if address then
        weight = parse_weight(written)
        if not weight then
            return nil
        end
        text = address
    end
    local host, port = text:match("^(%d+%.%d+%.%d+%.%d+):(%d+)$")
    if host then
        if not is_address(AF_INET, host) then
            return nil
        end
    else
        local inner
        inner, port = text:match("^%[([%x:%.]+)%]:(%d+)$")
        if not inner or not is_address(AF_INET6, inner) then
            return nil
        end
        host = "[" .. inner .. "]"
    end
    if port:sub(1, 1) == "0" or #port > 5 or tonumber(port) > 65535 then
        return nil
    end
    return { host, tonumber(port), weight }
end

-- "" is no instance; otherwise host:port items, none of them empty.
local function parse_peers(raw)
    local peers = {}
    if raw == "" then
        return peers
    end
    for item in (raw .. ","):gmatch("([^,]*),") do
        local peer = parse_peer(item)
        if not peer then
            return nil, "bad instance " .. item:sub(1, 80)
        end
        peers[#peers + 1] = peer
    end
    return peers
end

local function is_app(name)
    return #name <= 63 and name:sub(-1) ~= "-" and name:match("^[a-z0-9][a-z0-9-]*$") ~= nil
end

-- "revision <n>[ full]" then "<app> <instances>" lines, one "\n" after each:
-- exactly what routerd writes. The revision, whether it is the whole table,
-- and app -> instances; or nil and the first fault. A revision has at most 14
-- digits: Lua prints a larger number as 1e+14, which routerd could not read back.
local function parse_body(body)
    local lines = {}
    local text = body:sub(-1) == "\n" and body or body .. "\n"
    for line in text:gmatch("([^\n]*)\n") do
        lines[#lines + 1] = line
    end
    local revision, mode = (lines[1] or ""):match("^revision (%d+)(.*)$")
    local whole = revision and (revision == "0" or revision:sub(1, 1) ~= "0") and #revision <= 14
    if not whole or (mode ~= "" and mode ~= " full") then
        return nil, "first line must be 'revision <n> [full]'"
    end
    local entries = {}
    for index = 2, #lines do
        local app, raw = lines[index]:match("^(%S+) (%S*)$")
        if not app or not is_app(app) then
            return nil, "bad line " .. lines[index]:sub(1, 80)
        end
        local peers, err = parse_peers(raw)
        if not peers then
            return nil, app .. ": " .. err
        end
        entries[app] = raw
    end
    return tonumber(revision), mode == " full", entries
end

-- Put back what ``saved`` holds (key -> old value, false: absent), freeing first.
local function undo(dict, saved)
    for key, old in pairs(saved) do
        if old == false then
            dict:delete(key)
        end
    end
    for key, old in pairs(saved) do
        if old ~= false then
            dict:safe_set(key, old)
        end
    end
end

-- Validate the whole body first, then apply all of it or, should the dict run
-- out of room half way, none of it.
local function apply(body)
    local revision, full, entries = parse_body(body)
    if not revision then
        return nil, full
    end
    local dict = ngx.shared[DICT]
    local saved = {}
    local function change(key, value)
        if saved[key] == nil then
            saved[key] = dict:get(key) or false
        end
        if value == nil then
            dict:delete(key)
            return true
        end
        return dict:safe_set(key, value)
    end
    if full then
        for _, key in ipairs(dict:get_keys(0)) do
            if key:sub(1, 4) == "app:" and not entries[key:sub(5)] then
                change(key, nil)
            end
        end
    end
    for app, raw in pairs(entries) do
        local ok, err = change("app:" .. app, raw)
        if not ok then
            undo(dict, saved)
            return nil, "shared dict " .. DICT .. ": " .. err
        end
    end
    dict:set("revision", revision)
    return revision
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

-- The app's parsed entry, parsed again only when its line changed.
local function entry_of(app)
    local raw = ngx.shared[DICT]:get("app:" .. app)
    if not raw or raw == "" then
        return nil
    end
    local cached = parsed[app]
    if cached and cached.raw == raw then
        return cached
    end
    local peers = parse_peers(raw)
    local entry = { raw = raw, peers = peers, weighted = false, current = {} }
    for index, peer in ipairs(peers) do
        entry.current[index] = 0
        entry.weighted = entry.weighted or peer[3] ~= 1
    end
    parsed[app] = entry
    return entry
end

-- nginx's smooth weighted round robin: every peer gains its weight, the one
-- ahead is picked and loses the total. Over each cycle of the weights' sum,
-- each peer is picked exactly its weight's number of times, spread out.
local function pick_weighted(entry)
    local peers, current = entry.peers, entry.current
    local total, best = 0, 1
    for index = 1, #peers do
        current[index] = current[index] + peers[index][3]
        total = total + peers[index][3]
        if current[index] > current[best] then
            best = index
        end
    end
    current[best] = current[best] - total
    return best
end

function _M.route()
    local app = ngx.var.routerd_app
    local entry = entry_of(app)
    if not entry or #entry.peers == 0 then
        ngx.status = 503
        ngx.header["Content-Type"] = "text/plain"
        ngx.say("No instance of this app is running.")
        return ngx.exit(503)
    end
    local peers, index = entry.peers, nil
    if entry.weighted then
        index = pick_weighted(entry)
    else
        index = (next_index[app] or 0) % #peers + 1
        next_index[app] = index
    end
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
