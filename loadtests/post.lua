-- wrk script: POST one body read from a file, then print a machine-readable summary.
--   wrk -t1 -c16 -d10s -s loadtests/post.lua URL -- BODY_FILE CONTENT_TYPE [HEADER_LENGTH]
-- HEADER_LENGTH, when given, is sent as Inference-Header-Content-Length (binary tensors).
-- The last line is "WRKJSON {...}" with latency percentiles in microseconds.

local non2xx = 0

function init(args)
  local path, ctype, hlen = args[1], args[2] or "application/json", args[3]
  local f = assert(io.open(path, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = ctype
  if hlen and hlen ~= "" then
    wrk.headers["Inference-Header-Content-Length"] = hlen
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

-- Each thread has its own Lua state; wrk only aggregates status>399 itself, so collect ours.
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, ' ..
    '"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d}\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, bad,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
