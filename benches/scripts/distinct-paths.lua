-- wrk -s: each request's path is one wrk has not sent before (a counter),
-- spread over /svc0/ .. /svc99/, so that a policy's decision cache never
-- answers and every decision is evaluated.
local sent = 0

request = function()
  sent = sent + 1
  return wrk.format("GET", "/svc" .. (sent % 100) .. "/items/" .. sent)
end
