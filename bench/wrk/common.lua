-- Shared by the HAP body scripts: auth header from the environment, a distinct valid mainland
-- China mobile number per recipient (no dedup or limit cache can flatter the run), and either
-- a paced rate (HAPSMS_RATE_FILE) or a backoff on 503 (HAPSMS_BACKOFF=1).
local M = {}

local token = os.getenv("HAPSMS_TOKEN") or "dev-token"
local header = os.getenv("HAPSMS_TOKEN_HEADER") or "Authorization"
M.headers = {["Content-Type"] = "application/json"}
if header:lower() == "authorization" then
  M.headers[header] = "Bearer " .. token
else
  M.headers[header] = token
end

M.message = os.getenv("HAPSMS_MESSAGE") or "您的验证码是123456，感谢您的使用！"
M.signature = os.getenv("HAPSMS_SIGNATURE") or "明道云"

-- 139 + 8 digits: valid whatever the digits. Thread t starts at t * 10^7 so threads differ.
local counter = 0
local base = 0
function M.set_thread_base(n) base = n * 10000000 end
function M.next_number()
  counter = counter + 1
  return string.format("139%08d", (base + counter) % 100000000)
end

-- HAPSMS_RATE_FILE=PATH paces the posts of all connections of a thread to the rate (posts/s)
-- written in that file, read again every 50 ms: `make bench` writes there the rate that holds
-- the outbox near a set depth (bench/run.py, the pipeline stage). wrk has no clock for Lua;
-- LuaJIT's ffi reads CLOCK_MONOTONIC.
local function pacer(path)
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } hapsms_timespec;
    int clock_gettime(int clk, hapsms_timespec *tp);
  ]]
  local ts = ffi.new("hapsms_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval, next_slot, read_at = 1000, 0, -1000
  return function()
    local now = now_ms()
    if now - read_at >= 50 then
      read_at = now
      local fh = io.open(path, "r")
      if fh then
        local rate = tonumber(fh:read("*l") or "")
        fh:close()
        if rate and rate > 0 then interval = 1000 / rate end
      end
    end
    -- each request takes the next free slot: the rate holds whatever the connections do
    local slot = math.max(now, next_slot)
    next_slot = slot + interval
    return math.floor(slot - now)
  end
end

function M.install(body_fn)
  local threads = 0
  setup = function(thread)
    thread:set("thread_index", threads)
    threads = threads + 1
  end
  init = function(args)
    M.set_thread_base(thread_index or 0)
  end
  request = function()
    return wrk.format("POST", nil, M.headers, body_fn())
  end
  local rate_file = os.getenv("HAPSMS_RATE_FILE")
  if rate_file and rate_file ~= "" then
    delay = pacer(rate_file)
  elseif os.getenv("HAPSMS_BACKOFF") == "1" then
    local wait = 0
    response = function(status, headers, body)
      if status == 503 then
        wait = math.min(200, math.max(1, wait * 2))
      else
        wait = math.floor(wait / 2)
      end
    end
    delay = function() return wait end
  end
end

return M
