defmodule Sidecar.TelemetryTest do
  # Worker events reach attached handlers in :telemetry's shape; handlers detach cleanly.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{Telemetry, Tensor}

  test "call spans arrive as [:sidecar, :call, :start | :stop | :exception] with measurements and metadata" do
    test = self()
    id = make_ref()
    events = [[:sidecar, :call, :start], [:sidecar, :call, :stop], [:sidecar, :call, :exception]]
    :ok = Telemetry.attach_many(id, events, fn e, m, md, cfg -> send(test, {e, m, md, cfg}) end, :my_config)
    assert [_, _, _] = Telemetry.list_handlers([:sidecar, :call])

    a = Tensor.from_binary!(floats([1.0, 2.0]), "float32", [2])
    {:ok, r} = Sidecar.call(pool(), "mul", [a, a], request_id: "telemetry-test-1")
    rid = r.request_id
    assert rid == "telemetry-test-1"

    assert_receive {[:sidecar, :call, :start], %{system_time: _, bytes_in: 16},
                    %{op: "mul", request_id: ^rid}, :my_config},
                   5_000

    assert_receive {[:sidecar, :call, :stop], %{duration: d, bytes_out: 8, compute_ns: c},
                    %{request_id: ^rid} = md, :my_config},
                   5_000

    assert md.op == "mul" and md.request_id == rid and md.pool == pool() and md.os_pid == r.os_pid
    assert d > 0 and c > 0

    {:error, _} =
      Sidecar.call(pool(), "mul", [a, Tensor.from_binary!(floats([1.0, 2.0, 3.0]), "float32", [3])],
        request_id: "telemetry-test-err"
      )

    assert_receive {[:sidecar, :call, :exception], %{duration: _},
                    %{kind: :shape_mismatch, op: "mul", request_id: "telemetry-test-err"}, _},
                   5_000

    :ok = Telemetry.detach(id)
    assert {:error, :not_found} = Telemetry.detach(id)
    # A probe still attached: once it saw this call's stop event and the workers handled everything
    # they had, the detached handler would have sent its message too.
    probe = make_ref()

    :ok =
      Telemetry.attach(probe, [:sidecar, :call, :stop], fn _, _, md, _ -> send(test, {probe, md}) end, nil)

    {:ok, _} = Sidecar.call(pool(), "mul", [a, a], request_id: "telemetry-test-2")
    assert_receive {^probe, %{request_id: "telemetry-test-2"}}, 5_000
    sync_workers(pool())
    Telemetry.detach(probe)
    refute_received {[:sidecar, :call, :stop], _, %{request_id: "telemetry-test-2"}, _}
  end

  test "a handler that raises is detached and calls go on" do
    test = self()
    id = make_ref()
    probe = make_ref()
    :ok = Telemetry.attach(id, [:sidecar, :call, :stop], fn _, _, _, _ -> raise "boom" end, nil)

    assert {:error, :already_exists} =
             Telemetry.attach(id, [:sidecar, :call, :stop], fn _, _, _, _ -> :ok end, nil)

    :ok =
      Telemetry.attach(probe, [:sidecar, :call, :stop], fn _, _, md, _ -> send(test, {probe, md}) end, nil)

    {:ok, _} = Sidecar.call(pool(), "debug.pid", [], request_id: "raising-handler")
    # Both handlers ran on that event in the worker's process; once it answers, it is done with them.
    assert_receive {^probe, %{request_id: "raising-handler"}}, 5_000
    sync_workers(pool())
    assert [%{id: ^probe}] = Telemetry.list_handlers([:sidecar, :call, :stop])
    Telemetry.detach(probe)
    {:ok, _} = Sidecar.call(pool(), "debug.pid", [])
  end

  test "memory samples arrive as [:sidecar, :memory]" do
    test = self()
    id = make_ref()
    :ok = Telemetry.attach(id, [:sidecar, :memory], fn e, m, md, _ -> send(test, {e, m, md}) end, nil)
    # Workers sample every memory_interval_s (5 s by default; the first sample comes at once, so
    # restart-free pools may have sent theirs already): a fresh subscription is not needed, just wait.
    assert_receive {[:sidecar, :memory], %{rss_bytes: rss, leases: _}, %{os_pid: _, pool: _}}, 7_000
    assert rss > 0
    Telemetry.detach(id)
  end

  test "hardware and the op list come from a worker" do
    {:ok, hw} = Sidecar.hardware(pool())
    assert %{device: "cpu", cpu: %{cores: cores, threads: _}, cuda: %{available: _}, sidecar_version: _} = hw
    assert cores > 0
    {:ok, ops} = Sidecar.list_ops(pool())
    add = Enum.find(ops, &(&1.name == "add"))
    assert %{min_inputs: 2, max_inputs: 2, idempotent: true} = add
    assert %{idempotent: false} = Enum.find(ops, &(&1.name == "debug.segfault"))
  end
end
