defmodule Sidecar.BreakerTest do
  # Parity with the Python pool: the circuit breaker (fed only by crashes the work caused), health
  # checks, fast replacement from the template, and errors that say why a pool cannot start.
  # Each test runs its own pool, with non-default settings where the test says so.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{Breaker, Error, Telemetry, Tensor}

  setup do
    test = self()
    id = {__MODULE__, make_ref()}

    events = [
      [:sidecar, :pool, :crash],
      [:sidecar, :pool, :breaker],
      [:sidecar, :pool, :restart],
      [:sidecar, :worker, :ready]
    ]

    :ok = Telemetry.attach_many(id, events, fn e, m, md, _ -> send(test, {:event, e, m, md}) end, nil)
    on_exit(fn -> Telemetry.detach(id) end)
  end

  defp start_pool(name, opts) do
    {:ok, sup} = Sidecar.start_link([name: name] ++ opts)
    Process.unlink(sup)
    on_exit(fn -> if Process.alive?(sup), do: Sidecar.stop(name) end)
    name
  end

  defp add_ok?(pool) do
    a = Tensor.from_binary!(floats([1.0, 2.0]), "float32", [2])
    match?({:ok, %{outputs: [_]}}, Sidecar.call(pool, "add", [a, a], timeout: 20_000))
  end

  test "caused crashes open the breaker: ready workers serve, a call with none fails fast, the probe closes it" do
    pool = start_pool(:breaker_pool, workers: 2, debug_ops: true, breaker: [threshold: 2, cooldown_ms: 1_000])
    :ok = Sidecar.await_ready(pool, :all, 60_000)

    {:error, %Error{kind: :worker_crashed, classification: :segfault}} = Sidecar.call(pool, "debug.segfault", [])
    :ok = Sidecar.await_ready(pool, :all, 60_000)
    refute_received {:event, [:sidecar, :pool, :breaker], _, _}
    {:error, %Error{kind: :worker_crashed, classification: :segfault}} = Sidecar.call(pool, "debug.segfault", [])
    assert_receive {:event, [:sidecar, :pool, :breaker], %{crashes: 2}, %{state: :open, classification: :segfault}}

    # The crashed slot waits for the probe; the healthy worker serves calls that crash nothing.
    assert_receive {:event, [:sidecar, :pool, :restart], _, %{pool: :breaker_pool, held: true, slot: held}}, 10_000
    assert %{breaker: %{state: :open, held_slots: [^held]}} = Sidecar.info(pool)
    assert Enum.find(Sidecar.status(pool), &(&1.slot == held)).status == :held
    assert add_ok?(pool)

    # The last ready worker killed from outside: not counted, but no worker is left to serve.
    [%{os_pid: last}] = Enum.filter(Sidecar.status(pool), &(&1.status == :ready))
    System.cmd("kill", ["-KILL", "#{last}"])
    assert_receive {:event, [:sidecar, :pool, :crash], _, %{os_pid: ^last, classification: :killed, caused: false}}, 10_000

    # Fails at once with the breaker's error and the last crash's fields, not after its timeout.
    assert {:error, %Error{kind: :circuit_open, classification: :segfault, op: "add"} = err} =
             Sidecar.call(pool, "add", [1, 2], timeout: 60_000)

    assert err.message =~ "circuit breaker of :breaker_pool open after 2 worker crashes"
    assert err.message =~ "segmentation fault"

    # After the cool-down one worker starts as the probe; ready, it closes the breaker and every
    # held slot starts.
    assert_receive {:event, [:sidecar, :pool, :breaker], _, %{state: :half_open}}, 10_000
    assert_receive {:event, [:sidecar, :pool, :breaker], _, %{state: :closed}}, 30_000
    :ok = Sidecar.await_ready(pool, :all, 60_000)
    assert %{breaker: %{state: :closed, recent_failures: 0}} = Sidecar.info(pool)
    assert add_ok?(pool)
  end

  test "external kills of serving workers never open the breaker" do
    pool = start_pool(:kill_pool, workers: 2, breaker: [threshold: 2])
    :ok = Sidecar.await_ready(pool, :all, 60_000)

    for _ <- 1..3 do
      [%{os_pid: victim} | _] = Sidecar.status(pool)
      System.cmd("kill", ["-KILL", "#{victim}"])
      assert_receive {:event, [:sidecar, :pool, :crash], _, %{os_pid: ^victim, caused: false}}, 10_000
      :ok = Sidecar.await_ready(pool, :all, 60_000)
    end

    refute_received {:event, [:sidecar, :pool, :breaker], _, _}
    assert %{breaker: %{state: :closed, recent_failures: 0}} = Sidecar.info(pool)
    assert add_ok?(pool)
  end

  test "a killed worker is replaced by a fork of the template and the pool serves on" do
    pool = start_pool(:fork_pool, workers: 2)
    :ok = Sidecar.await_ready(pool, :all, 60_000)
    assert %{template: %{status: :ready, rss_bytes: rss}} = Sidecar.info(pool)
    assert rss > 0
    assert Enum.all?(Sidecar.status(pool), &(&1.via == :fork))
    [%{os_pid: victim, slot: slot} | _] = Sidecar.status(pool)
    System.cmd("kill", ["-KILL", "#{victim}"])

    assert_receive {:event, [:sidecar, :worker, :ready], %{since_exit: since}, %{slot: ^slot, via: :fork, restart: true}},
                   30_000

    assert since > 0
    assert add_ok?(pool)
  end

  test "with a warm spare, a killed worker's slot is served by the spare at once, and a new spare starts" do
    pool = start_pool(:spare_pool, workers: 1, spares: 1)
    :ok = Sidecar.await_ready(pool, :all, 60_000)
    assert_receive {:event, [:sidecar, :worker, :ready], _, %{pool: :spare_pool, slot: {:spare, 0}, os_pid: spare}}, 60_000
    assert [%{slot: 0, status: :ready, os_pid: victim}, %{slot: {:spare, 0}, status: :spare}] = Sidecar.status(pool)
    System.cmd("kill", ["-KILL", "#{victim}"])

    # The spare's process now serves slot 0 (no process started for it); another spare follows.
    assert_receive {:event, [:sidecar, :worker, :ready], _, %{slot: 0, via: :spare, os_pid: ^spare, restart: true}}, 30_000
    assert_receive {:event, [:sidecar, :worker, :ready], _, %{slot: {:spare, 0}, os_pid: next}}, 60_000
    assert next not in [spare, victim]
    assert {:ok, %{os_pid: ^spare}} = Sidecar.call(pool, "add", [Tensor.from_binary!(floats([1.0]), "float32", [1]), 1.0])
    assert [%{slot: 0, os_pid: ^spare}, %{slot: {:spare, 0}, os_pid: ^next, status: :spare}] = Sidecar.status(pool)
  end

  test "a worker that stops answering its health checks is killed as :unresponsive and replaced" do
    pool = start_pool(:health_pool, workers: 1, health: [interval_ms: 200, timeout_ms: 200, failures: 2])
    :ok = Sidecar.await_ready(pool, :all, 60_000)
    [%{os_pid: frozen}] = Sidecar.status(pool)
    System.cmd("kill", ["-STOP", "#{frozen}"])

    assert_receive {:event, [:sidecar, :pool, :crash], _, %{os_pid: ^frozen, classification: :unresponsive, caused: true}},
                   20_000

    assert_receive {:event, [:sidecar, :worker, :ready], _, %{pool: :health_pool, restart: true}}, 30_000
    assert add_ok?(pool)
  end

  test "a pool whose python does not exist fails its calls saying so, at once" do
    pool = start_pool(:no_python_pool, workers: 1, python: "/no/such/dir/python3")
    assert {:error, %Error{kind: :worker_crashed, classification: :spawn_failed} = err} = Sidecar.call(pool, "add", [1, 2])
    assert err.message =~ "/no/such/dir/python3 does not exist"
    assert {:error, %Error{message: "no worker of :no_python_pool could start" <> _}} = Sidecar.await_ready(pool, 1, 30_000)
  end

  test "a pool whose python lacks the sidecar package fails its calls with the worker's stderr" do
    # An interpreter in isolated mode (-I: no PYTHONPATH, no site of the user, no cwd on sys.path)
    # cannot import the repo's package.
    bare = Path.join(System.tmp_dir!(), "sidecar-test-bare-python-#{System.unique_integer([:positive])}")
    File.write!(bare, "#!/bin/sh\nexec #{System.find_executable("python3")} -I \"$@\"\n")
    File.chmod!(bare, 0o700)
    on_exit(fn -> File.rm(bare) end)
    pool = start_pool(:bare_python_pool, workers: 1, python: bare)

    assert {:error, %Error{kind: :worker_crashed, classification: :python_error} = err} =
             Sidecar.call(pool, "add", [1, 2], timeout: 30_000)

    assert err.message =~ "No module named sidecar"
    assert Enum.any?(err.stderr_tail, &(&1 =~ "No module named sidecar"))
  end

  test "a typo in a pool or call option is an error, not ignored" do
    assert_raise ArgumentError, ~r/unknown keys \[:wrkers\]/, fn -> Sidecar.start_link(name: :typo_pool, wrkers: 2) end
    assert_raise ArgumentError, ~r/workers must be an integer >= 1/, fn -> Sidecar.start_link(name: :typo_pool, workers: 0) end
    assert_raise ArgumentError, ~r/unknown keys \[:treshold\]/, fn -> Sidecar.start_link(name: :typo_pool, breaker: [treshold: 1]) end
    assert_raise ArgumentError, ~r/unknown keys \[:timout\]/, fn -> Sidecar.call(pool(), "add", [1, 2], timout: 10) end
    assert_raise ArgumentError, ~r/unknown keys \[:inlin\]/, fn -> Tensor.from_binary(<<0>>, "uint8", [1], inlin: true) end
  end

  test "the breaker state machine: a window of crashes, a cool-down, one probe" do
    b = Breaker.new(threshold: 2, window_ms: 100, cooldown_ms: 50)
    {b, nil} = Breaker.record_failure(b, 0)
    # The first crash left the window before the second came: still closed.
    {b, nil} = Breaker.record_failure(b, 150)
    {b, :opened} = Breaker.record_failure(b, 160)
    assert b.state == :open and Breaker.retry_after(b, 170) == 40
    {b, false} = Breaker.try_probe(b, 170)
    {b, true} = Breaker.try_probe(b, 210)
    {^b, false} = Breaker.try_probe(b, 211)
    # The probe failed: open again for another cool-down; then it succeeds and the window is cleared.
    {b, :opened} = Breaker.record_failure(b, 220)
    {b, true} = Breaker.try_probe(b, 280)
    {b, :closed} = Breaker.record_success(b)
    assert b.state == :closed and Breaker.recent_failures(b, 280) == 0 and b.opened_count == 2
    assert_raise ArgumentError, fn -> Breaker.new(threshold: 0) end
  end
end
