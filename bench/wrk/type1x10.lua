-- HAP Type 1 (SMS), ten recipients per body, all new numbers: ten outbox entries a request.
--   HAPSMS_TOKEN=dev-token wrk -t1 -c64 -d10s -s bench/wrk/type1x10.lua http://127.0.0.1:8080/sms/webhook
package.path = debug.getinfo(1, "S").source:match("^@?(.*/)") .. "?.lua;" .. package.path
local hap = require("common")

hap.install(function()
  local numbers = {}
  for i = 1, 10 do numbers[i] = '"' .. hap.next_number() .. '"' end
  return '{"Type":1,"Data":{"Mobiles":[' .. table.concat(numbers, ",") .. '],"Message":"'
    .. hap.message .. '","Signature":"' .. hap.signature .. '"}}'
end)
