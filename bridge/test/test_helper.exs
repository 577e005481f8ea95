# The suite runs against real sidecar workers started with the repo's Python (the pytest wrapper
# sets SIDECAR_PYTHON; by hand it defaults to ../.venv/bin/python).
python = System.get_env("SIDECAR_PYTHON") || Path.expand("../.venv/bin/python", File.cwd!())

unless File.exists?(python) do
  IO.puts(
    :stderr,
    "no Python for the sidecar workers at #{python}: run scripts/install.sh or set SIDECAR_PYTHON"
  )

  System.halt(1)
end

System.put_env("SIDECAR_PYTHON", python)

defmodule SidecarTest do
  @moduledoc false
  # One pool shared by the test modules (a worker start costs ~1-2 s of torch import); modules that
  # need their own pool start one.
  @pool :sidecar_test_pool
  def pool, do: @pool

  def start_shared_pool do
    # Not linked to any test process: it lives for the whole suite and is stopped in after_suite.
    {:ok, sup} =
      Supervisor.start_link([{Sidecar, name: @pool, workers: 2, debug_ops: true, timeout: 20_000}],
        strategy: :one_for_one
      )

    Process.unlink(sup)
    :ok = Sidecar.await_ready(@pool, :all, 60_000)
    sup
  end

  @doc """
  Starts a pool of a test module's own (`Sidecar` options), unlinked from the caller, and stops it
  when the test (from `setup`) or the module (from `setup_all`) is done.
  """
  def start_own_pool(name, opts) do
    {:ok, sup} = Supervisor.start_link([{Sidecar, [name: name] ++ opts}], strategy: :one_for_one)
    Process.unlink(sup)
    :ok = Sidecar.await_ready(name, :all, 60_000)

    ExUnit.Callbacks.on_exit(fn ->
      Sidecar.stop(name)
      Supervisor.stop(sup)
    end)
  end

  def floats(list), do: for(x <- list, into: <<>>, do: <<x::float-32-native>>)
  def to_floats(bin), do: for(<<x::float-32-native <- bin>>, do: x)

  @doc "Files of this VM's run in /dev/shm."
  def run_files, do: Sidecar.Shm.run_files()

  @doc """
  Returns once every worker of `pool` has handled each message it had (each worker answers a call,
  and a process handles its messages in order): telemetry handlers it was running have finished.
  """
  def sync_workers(pool) do
    Sidecar.status(pool)
    :ok
  end

  @doc "Polls `fun` until it is true (for a state no message announces); the deadline stops a hung test."
  def wait_until(fun, timeout \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_wait(fun, deadline)
  end

  defp do_wait(fun, deadline) do
    cond do
      fun.() -> :ok
      System.monotonic_time(:millisecond) > deadline -> :timeout
      true -> Process.sleep(10) && do_wait(fun, deadline)
    end
  end
end

shared = SidecarTest.start_shared_pool()

ExUnit.after_suite(fn _ ->
  :ok = Sidecar.stop(SidecarTest.pool())
  Supervisor.stop(shared)
  left = SidecarTest.run_files()

  if left != [] do
    IO.puts(
      :stderr,
      "\n/dev/shm leak: #{length(left)} segments of this run left after the suite: #{inspect(left)}"
    )

    System.halt(1)
  end

  IO.puts("/dev/shm: no segment of run #{Sidecar.Shm.run_id()} left after the suite")
end)

ExUnit.start(capture_log: true, timeout: 60_000)
