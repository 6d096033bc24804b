-- wrk script: POST one body read from a file, then print a machine-readable summary.
--   capacity:   wrk -t1 -c16 -d10s -s loadtests/post.lua URL -- BODY_FILE CONTENT_TYPE [HEADER_LENGTH|-]
--   fixed rate: wrk -t1 -c32 -d10s -s loadtests/post.lua URL -- BODY_FILE CONTENT_TYPE HEADER_LENGTH|- RATE
-- HEADER_LENGTH, when given (not "-"), is sent as Inference-Header-Content-Length (binary tensors).
-- The last line is "WRKJSON {...}" with latency percentiles in microseconds.
--
-- With RATE (requests/s per wrk thread), request start times follow a Poisson schedule
-- ("wrk2-style"): a connection that becomes free takes the next slot of the schedule (delay() =
-- time until that slot). Latency is measured from the write of each request, so it is only
-- meaningful while the server keeps up (enough connections, moderate load): the achieved rate is
-- printed to check it. Why not `hey -q`: hey's per-worker tickers start together, so it sends
-- bursts of -c requests at once; at 1,000 req/s it reports p50 8 ms where Triton answers in 1-3 ms.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } understudy_timespec;
  int clock_gettime(int clk_id, understudy_timespec *tp);
]]
local ts = ffi.new("understudy_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

non2xx = 0 -- global: done() reads it from each thread with thread:get()
local mean_ms = 1
local next_ms = nil

local function poisson_delay()
  local now = now_ms()
  if next_ms == nil or next_ms < now - 100 then
    next_ms = now -- more than 100 ms behind: drop the backlog rather than burst to catch up
  end
  next_ms = next_ms - math.log(1 - math.random()) * mean_ms
  local d = next_ms - now
  if d <= 0 then
    return 0
  end
  return math.floor(d + 0.5)
end

function init(args)
  local path, ctype, hlen, rate = args[1], args[2] or "application/json", args[3], tonumber(args[4])
  local f = assert(io.open(path, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = ctype
  if hlen and hlen ~= "" and hlen ~= "-" then
    wrk.headers["Inference-Header-Content-Length"] = hlen
  end
  if rate then
    mean_ms = 1000 / rate
    math.randomseed(tonumber(tostring(now_ms()):gsub("%.", ""):sub(-9)) or 1)
    delay = poisson_delay -- wrk looks for a global delay() after init()
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
