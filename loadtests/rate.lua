-- wrk script for latency at a fixed offered rate ("wrk2-style"): POST one body from a file,
-- with request start times drawn from a Poisson schedule of RATE requests/s per wrk thread.
--   wrk -t1 -c32 -d10s -s loadtests/rate.lua URL -- BODY_FILE CONTENT_TYPE HEADER_LENGTH|- RATE
-- A connection that becomes free takes the next slot of the schedule (delay() = time until that
-- slot). Latency is measured from the write of each request, so it is only meaningful while the
-- server keeps up (enough connections, moderate load): the achieved rate is printed to check it.
-- Why not `hey -q`: hey's per-worker tickers start together, so it sends bursts of -c requests
-- at once; at 1,000 req/s it reports p50 8 ms where Triton answers in 1-3 ms.
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

local non2xx = 0
local mean_ms = 1
local next_ms = nil

function init(args)
  local path, ctype, hlen, rate = args[1], args[2], args[3], tonumber(args[4])
  local f = assert(io.open(path, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = ctype or "application/json"
  if hlen and hlen ~= "" and hlen ~= "-" then
    wrk.headers["Inference-Header-Content-Length"] = hlen
  end
  mean_ms = 1000 / assert(rate, "RATE (requests/s per thread) is required")
  math.randomseed(tonumber(tostring(now_ms()):gsub("%.", ""):sub(-9)) or 1)
end

function delay()
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

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

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
