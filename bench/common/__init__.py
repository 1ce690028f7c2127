"""Plumbing shared by the benchmarks, one module per concern.

- ``cpu``: CPU seconds and memory from /proc, other processes' CPU (noise), waiting for a
  quiet machine, core pinning, a speed calibration.
- ``histogram``: the log-linear latency histogram and exact nearest-rank percentiles.
- ``http``: a keep-alive (and pipelining) HTTP/1.1 client protocol for load generators.
- ``server``: etherd and peer servers as pinned child processes with generated configs.
- ``subclient``: the C WebSocket subscriber load client (build, run, control).
- ``pg``: PostgreSQL databases and throwaway clusters.
- ``metrics``: ``/metrics`` scraping.
- ``profile``: py-spy recording and summaries.
- ``machine``: the machine and version header of every result file.
"""
