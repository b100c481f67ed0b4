-- HAP Type 1 (SMS), one recipient, a new number on every request.
--   HAPSMS_TOKEN=dev-token wrk -t1 -c64 -d10s -s bench/wrk/type1.lua http://127.0.0.1:8080/sms/webhook
package.path = debug.getinfo(1, "S").source:match("^@?(.*/)") .. "?.lua;" .. package.path
local hap = require("common")

hap.install(function()
  return '{"Type":1,"Data":{"Mobiles":["' .. hap.next_number() .. '"],"Message":"'
    .. hap.message .. '","Signature":"' .. hap.signature .. '"}}'
end)
