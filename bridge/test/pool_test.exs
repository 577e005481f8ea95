defmodule Sidecar.PoolTest do
  # The crash barrier: a worker that dies takes no caller down, its calls get a classified error (or
  # succeed on another worker when idempotent), and the pool is back to full strength.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{Error, Tensor}

  setup do
    :ok = Sidecar.await_ready(pool(), :all, 30_000)
    test = self()
    id = {__MODULE__, make_ref()}

    :ok =
      Sidecar.Telemetry.attach_many(
        id,
        [
          [:sidecar, :call, :start],
          [:sidecar, :pool, :crash],
          [:sidecar, :pool, :retry],
          [:sidecar, :pool, :restart],
          [:sidecar, :worker, :ready]
        ],
        fn event, m, md, _ -> send(test, {:event, event, m, md}) end,
        nil
      )

    on_exit(fn -> Sidecar.Telemetry.detach(id) end)
  end

  test "a segfault in an op is absorbed: the call gets a classified crash, the worker comes back" do
    before = Sidecar.status(pool())
    assert {:error, %Error{kind: :worker_crashed} = err} = Sidecar.call(pool(), "debug.segfault", [])
    assert %Error{classification: :segfault, signal: 11, exit_code: 139, op: "debug.segfault"} = err
    assert is_integer(err.pid) and is_list(err.stderr_tail)
    assert err.pid in Enum.map(before, & &1.os_pid)

    assert_receive {:event, [:sidecar, :pool, :crash], %{count: 1},
                    %{classification: :segfault, os_pid: crashed}}

    assert crashed == err.pid

    # Replaced: a new OS process in the same slot, the pool at full strength, calls served.
    assert_receive {:event, [:sidecar, :worker, :ready], _, %{restart: true, os_pid: new_pid}}, 30_000
    assert new_pid != crashed
    assert :ok = Sidecar.await_ready(pool(), :all, 30_000)
    assert Enum.all?(Sidecar.status(pool()), &(&1.status == :ready))
    refute crashed in Enum.map(Sidecar.status(pool()), & &1.os_pid)
    refute Sidecar.OsProcess.alive?(crashed)
    # Nothing of the dead worker is left in /dev/shm.
    assert Enum.filter(run_files(), &String.contains?(&1, "-#{crashed}-")) == []

    a = Tensor.from_binary!(floats([1.0]), "float32", [1])
    for _ <- 1..4, do: assert({:ok, _} = Sidecar.call(pool(), "add", [a, a]))
  end

  test "an idempotent call in flight on a worker killed with SIGKILL succeeds on another worker" do
    rid = "kill-retry-#{System.unique_integer([:positive])}"

    task =
      Task.async(fn -> Sidecar.call(pool(), "debug.sleep", [], attrs: [seconds: 2.0], request_id: rid) end)

    # The worker's own start event: the call is running in that OS process now.
    assert_receive {:event, [:sidecar, :call, :start], _, %{request_id: ^rid, os_pid: busy}}, 30_000
    System.cmd("kill", ["-KILL", "#{busy}"])

    assert {:ok, %Sidecar.Result{outputs: [2.0], os_pid: served_by}} = Task.await(task, 30_000)
    assert served_by != busy
    # SIGKILL from outside, no OOM kill counted by the cgroup: :killed, not blamed on the work.
    assert_receive {:event, [:sidecar, :pool, :crash], _, %{classification: :killed, os_pid: killed, caused: false}}
    assert killed == busy

    assert_receive {:event, [:sidecar, :pool, :retry], %{attempt: 2},
                    %{op: "debug.sleep", reason: :killed}}

    assert :ok = Sidecar.await_ready(pool(), :all, 30_000)
  end

  test "a call that is not idempotent is not retried: it gets the crash" do
    rid = "kill-no-retry-#{System.unique_integer([:positive])}"

    task =
      Task.async(fn ->
        Sidecar.call(pool(), "debug.sleep", [], attrs: [seconds: 30.0], idempotent: false, request_id: rid)
      end)

    assert_receive {:event, [:sidecar, :call, :start], _, %{request_id: ^rid, os_pid: busy}}, 30_000
    System.cmd("kill", ["-KILL", "#{busy}"])

    assert {:error, %Error{kind: :worker_crashed, classification: :killed, signal: 9, crashes: [%{caused: false}]}} =
             Task.await(task, 15_000)

    refute_received {:event, [:sidecar, :pool, :retry], _, _}
    assert :ok = Sidecar.await_ready(pool(), :all, 30_000)
  end

  test "many concurrent calls from many processes lose none, even while a worker is killed" do
    n_procs = 40
    per_proc = 10

    tasks =
      for p <- 1..n_procs do
        Task.async(fn ->
          for i <- 1..per_proc do
            x = p * 1000.0 + i
            # Every 5th call moves a 256 KiB tensor through shared memory, the rest go inline.
            {bin, shape} =
              if rem(i, 5) == 0,
                do: {floats(List.duplicate(x, 65_536)), [65_536]},
                else: {floats([x, -x]), [2]}

            t = Tensor.from_binary!(bin, "float32", shape)
            result = Sidecar.call(pool(), "add", [t, t])
            Tensor.free(t)

            case result do
              {:ok, %{outputs: [out]}} ->
                {:ok, Enum.uniq(to_floats(Tensor.to_binary!(out))) -- [2 * x, -2 * x]}

              {:error, err} ->
                {:error, err}
            end
          end
        end)
      end

    # Kill a worker once it runs one of the calls: `add` is idempotent, so its calls move to the
    # other one.
    assert_receive {:event, [:sidecar, :call, :start], _, %{op: "add", os_pid: victim}}, 30_000
    System.cmd("kill", ["-KILL", "#{victim}"])

    results = tasks |> Enum.map(&Task.await(&1, 60_000)) |> List.flatten()
    # Its replacement is a fork of the pool's template.
    assert_receive {:event, [:sidecar, :worker, :ready], _, %{restart: true, via: :fork}}, 30_000
    assert length(results) == n_procs * per_proc
    errors = for {:error, e} <- results, do: e
    assert errors == []
    # Each answer carried exactly the expected values.
    assert Enum.all?(results, &(&1 == {:ok, []}))
    assert :ok = Sidecar.await_ready(pool(), :all, 30_000)
  end

  test "a poison call (it crashed two workers) fails naming both crashes and never reaches a third worker" do
    # debug.segfault crashes every worker it runs on; idempotent: true makes it retryable, and a
    # max_attempts above 2 does not lift the guard.
    assert {:error, %Error{kind: :worker_crashed, crashes: [first, second]} = err} =
             Sidecar.call(pool(), "debug.segfault", [], idempotent: true, max_attempts: 5)

    for crash <- [first, second] do
      assert %{classification: :segfault, signal: 11, exit_code: 139, pid: os_pid} = crash
      assert is_integer(os_pid)
      assert err.message =~ "pid #{os_pid} (segfault)"
    end

    assert first.pid != second.pid
    assert err.message =~ "poison call"
    assert %Error{op: "debug.segfault", classification: :segfault, pid: last} = err
    assert last == second.pid

    # The crash events came before the reply (same sender): exactly these two workers died, and the
    # call was retried once.
    assert_received {:event, [:sidecar, :pool, :crash], _, %{os_pid: p1, classification: :segfault}}
    assert_received {:event, [:sidecar, :pool, :crash], _, %{os_pid: p2, classification: :segfault}}
    assert Enum.sort([p1, p2]) == Enum.sort([first.pid, second.pid])
    refute_received {:event, [:sidecar, :pool, :crash], _, _}
    assert_received {:event, [:sidecar, :pool, :retry], %{attempt: 2}, %{op: "debug.segfault"}}
    refute_received {:event, [:sidecar, :pool, :retry], _, _}

    # The replacements never saw the call: they are alive and serve.
    assert :ok = Sidecar.await_ready(pool(), :all, 30_000)
    serving = Enum.map(Sidecar.status(pool()), & &1.os_pid)
    assert Enum.all?(serving, &(Sidecar.OsProcess.alive?(&1) and &1 not in [first.pid, second.pid]))
    assert {:ok, _} = Sidecar.call(pool(), "debug.pid", [])
  end

  test "a call whose worker crashed once carries that crash when it is not retried" do
    assert {:error, %Error{kind: :worker_crashed, crashes: [only]} = err} =
             Sidecar.call(pool(), "debug.segfault", [])

    assert %{classification: :segfault, pid: pid} = only
    assert pid == err.pid
    refute err.message =~ "poison"
    assert :ok = Sidecar.await_ready(pool(), :all, 30_000)
  end

  test "a worker that cannot start fails calls with its exit and stderr, and restarts back off" do
    {:ok, sup} =
      Sidecar.start_link(
        name: :broken_pool,
        workers: 1,
        ops: ["no_such_ops_module_xyz"],
        restart_backoff: {200, 1_000}
      )

    assert_receive {:event, [:sidecar, :pool, :crash], _, %{pool: :broken_pool} = first}, 30_000
    assert first.classification == :python_error and first.exit_code == 1
    assert Enum.any?(first.stderr_tail, &String.contains?(&1, "no_such_ops_module_xyz"))
    # The second start follows at once, the third only after the backoff.
    assert_receive {:event, [:sidecar, :pool, :crash], _, %{pool: :broken_pool}}, 30_000
    assert_receive {:event, [:sidecar, :pool, :restart], %{delay_ms: 200}, %{pool: :broken_pool}}, 30_000
    # The call fails with the cause, not with "no worker ready within N ms".
    assert {:error, %Error{kind: :worker_crashed, classification: :python_error} = err} =
             Sidecar.call(:broken_pool, "add", [1, 2], timeout: 30_000)

    assert err.message =~ "no worker of :broken_pool could start"
    assert err.message =~ "No module named 'no_such_ops_module_xyz'"
    assert Enum.any?(err.stderr_tail, &String.contains?(&1, "no_such_ops_module_xyz"))
    assert {:error, %Error{message: "no worker of :broken_pool could start" <> _}} = Sidecar.await_ready(:broken_pool, 1, 30_000)
    Process.unlink(sup)
    :ok = Sidecar.stop(:broken_pool)
  end
end
