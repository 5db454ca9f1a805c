-- wrk script for bench/gunicorn_bench.py: posts distinct pre-signed Ploints
-- events, then prints one RESULT line of JSON.
--
--   wrk -t1 -c16 -d10s -s post_events.lua http://127.0.0.1:PORT -- EVENTS THREADS
--
-- EVENTS is a file of "signature<TAB>body" lines. Thread n of THREADS sends
-- lines n, n + THREADS, ... in order; if it runs out it starts again (those
-- are duplicates, counted as "wrapped").

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   local path, count = args[1], tonumber(args[2])
   requests = {}
   local line_number = 0
   for line in io.lines(path) do
      if line_number % count == tid then
         local signature, body = line:match("^(%x+)\t(.*)$")
         requests[#requests + 1] = wrk.format("POST", "/webhooks/ploints", {
            ["Content-Type"] = "application/json",
            ["X-Ploints-Signature"] = signature,
         }, body)
      end
      line_number = line_number + 1
   end
   index = 0
   wrapped = 0
end

function request()
   index = index + 1
   if index > #requests then
      index = 1
      wrapped = wrapped + 1
   end
   return requests[index]
end

function done(summary, latency, requests)
   local wrapped_total = 0
   for _, thread in ipairs(threads) do
      wrapped_total = wrapped_total + thread:get("wrapped")
   end
   local errors = summary.errors
   io.write(string.format(
      'RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d,'
         .. ' "max_us": %d, "non_2xx": %d, "connect_errors": %d, "read_errors": %d,'
         .. ' "write_errors": %d, "timeouts": %d, "wrapped": %d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max, errors.status, errors.connect, errors.read,
      errors.write, errors.timeout, wrapped_total))
end
