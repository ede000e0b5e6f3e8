-- wrk script: POST bodies from a corpus file, each made unique by replacing __SEQ__,
-- and print one JSON line of results. Usage: wrk -s bench/post.lua URL -- BODIES_FILE [TAG]
-- (TAG keeps one run's bodies distinct from another's against the same database: without it a
-- measured run would repeat its warm-up's bodies, and the ledger would answer them as duplicates)
local threads = {}
local bodies = {}
local count = 0
local sequence = 0
local tag = ""

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  tag = args[2] or ""
  for line in io.lines(args[1]) do
    count = count + 1
    bodies[count] = line
  end
end

function request()
  sequence = sequence + 1
  local body = string.gsub(bodies[(sequence % count) + 1], "__SEQ__", tag .. tid .. "-" .. sequence)
  return wrk.format("POST", nil, {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_ms": %.3f, "p99_ms": %.3f, "p999_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
