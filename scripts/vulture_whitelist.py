"""Names `vulture sidecar/` reports that are used, each with why (read by vulture, never imported).

Run: .venv/bin/vulture   (paths and confidence in pyproject.toml [tool.vulture]; scripts/test.sh runs it)
"""
# ruff: noqa: F821, B018
# Every line is a bare name or `_.attribute` reference: vulture counts it as a use.

# Module-level __getattr__ (PEP 562): the lazy imports of sidecar, sidecar.host, sidecar.observe.
__getattr__

# Ops registered by @op: called by name through the registry, never by Python name.
sum_  # builtin_ops: "sum"
max_  # builtin_ops: "max"
relu  # builtin_ops
segfault  # debug_ops (--debug-ops)
fpe  # debug_ops
exit_  # debug_ops: "debug.exit"
getenv  # debug_ops

# http.server / socketserver hooks and class settings (sidecar/observe/server.py): the stdlib calls/reads them.
_.do_GET
_.do_HEAD
_.log_message
_.address_family
daemon_threads
allow_reuse_address
protocol_version

# prometheus_client custom collectors: the registry calls collect() on every scrape.
_.collect

# Counters and state read by callers outside the package (tests, the dashboard/metrics, the guides):
# statistics of the arena, mapping cache, leases, telemetry queues and the dispatcher.
hits
misses
dropped_stale
dropped_dirty
_.discarded
_.dropped
_.calls_total
_.expired_total
_.orphaned_total
_.watched_clients
_.queue_depth  # Dispatcher.queue_depth: calls waiting for a slot (tests/test_dispatcher.py)
oom_confirmed  # crash.Classification field: the exit report's OOM evidence (guides/crash-barrier.md)
_.crashed  # crash.Classification.crashed: public (guides, tests)

# Public API the package's own code does not call (documented in guides/ or README, tested).
EXIT_USAGE  # cli: exit status 2 for a usage error (tests/test_cli.py)
validate_tensor_ref  # dataplane.validate: the descriptor check by itself (tests/test_descriptor_fuzz.py)
_.evict  # MappingCache.evict: drop one mapping (tests/test_mapcache.py)
_.open_ops  # OpBreakers.open_ops: which ops are open (tests/test_supervision_policy.py)
_.serve_metrics  # Pool.serve_metrics: the pool's Prometheus endpoint (guides/observability)
_.template_pid  # Pool.template_pid: the template process (tests/test_host_death.py, test_template_death.py)
_.session  # Pool.session() and OpContext.session: public API of resident state (guides/models-and-sessions.md)
_.lost  # Session.lost: whether the session's worker died (guides/models-and-sessions.md, tests)
_.ended  # Stream.ended: whether a stream is over (guides/streaming.md, tests)
