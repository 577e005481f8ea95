defmodule Sidecar.BusyTest do
  # A worker whose op holds the GIL in C cannot answer its health checks; its CPU time still
  # advances, so the pool counts it busy and never kills it as unresponsive. (A worker that stops
  # computing and answering, SIGSTOP, is still killed: breaker_test.exs.)
  use ExUnit.Case
  import SidecarTest

  @pool :sidecar_busy_test_pool

  setup do
    ops = Path.expand("../tests/busy_ops_module.py", File.cwd!())

    start_own_pool(@pool,
      workers: 1,
      ops: [ops],
      health: [interval_ms: 200, timeout_ms: 200, failures: 2],
      timeout: 30_000
    )
  end

  test "an op holding the GIL in C for seconds is busy, not killed" do
    [%{os_pid: os_pid}] = Sidecar.status(@pool)
    task = Task.async(fn -> Sidecar.call(@pool, "hold_gil", [], attrs: [seconds: 2.0]) end)
    assert wait_until(fn -> match?([%{health: :busy}], Sidecar.status(@pool)) end, 20_000) == :ok
    assert {:ok, %{outputs: [took]}} = Task.await(task, 30_000)
    assert took >= 1.0
    assert [%{os_pid: ^os_pid, consecutive_crashes: 0}] = Sidecar.status(@pool)
  end
end
