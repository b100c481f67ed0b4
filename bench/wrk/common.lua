-- Shared by the HAP body scripts: auth header from the environment, a distinct valid mainland
-- China mobile number per recipient (no dedup or limit cache can flatter the run), and an
-- optional backoff on 503 (HAPSMS_BACKOFF=1) that keeps the outbox at its cap, not above it.
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
  if os.getenv("HAPSMS_BACKOFF") == "1" then
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
