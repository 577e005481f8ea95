defmodule Sidecar.CleanupTest do
  # A pool of its own: after it stops, neither its workers nor any segment it made (or its workers
  # made) is left, crashes included. A new pool removes what dead VMs and workers left behind.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{OsProcess, Shm, Tensor}

  @mb 1024 * 1024

  test "stopping a pool leaves no worker process and no segment behind" do
    {:ok, sup} = Sidecar.start_link(name: :cleanup_pool, workers: 2, debug_ops: true)
    :ok = Sidecar.await_ready(:cleanup_pool, :all, 60_000)
    pids = Enum.map(Sidecar.status(:cleanup_pool), & &1.os_pid)

    pinned = Tensor.from_binary!(:binary.copy(<<3>>, 4 * @mb), "uint8", [4 * @mb], pool: :cleanup_pool)
    {:ok, held} = Sidecar.call(:cleanup_pool, "identity", [pinned], read: false)
    {:error, %{kind: :worker_crashed}} = Sidecar.call(:cleanup_pool, "debug.segfault", [])
    :ok = Sidecar.await_ready(:cleanup_pool, :all, 60_000)
    pids = Enum.uniq(pids ++ Enum.map(Sidecar.status(:cleanup_pool), & &1.os_pid))
    logs = Enum.map(Sidecar.status(:cleanup_pool), & &1.stderr_log)
    assert held.leases != [] and Enum.all?(logs, &File.exists?/1)

    Process.unlink(sup)
    :ok = Sidecar.stop(:cleanup_pool)

    assert Enum.all?(pids, &(not OsProcess.alive?(&1)))
    {:shm, %{name: name}} = pinned.storage
    refute File.exists?(Shm.path(name))
    left = Enum.filter(run_files(), fn f -> Enum.any?(pids, &String.contains?(f, "-#{&1}-")) end)
    assert left == []
    refute Enum.any?(logs, &File.exists?/1)
    assert {:error, %{kind: :invalid_argument}} = Sidecar.call(:cleanup_pool, "add", [1, 2])
  end

  test "a worker's stderr log is named after this VM and is mode 0600 from its creation" do
    [%{stderr_log: log} | _] = Sidecar.status(pool())
    assert Path.basename(log) =~ ~r/^sidecar-bridge-#{Shm.run_id()}-#{System.pid()}-/
    assert Bitwise.band(File.stat!(log).mode, 0o777) == 0o600
  end

  test "a new pool removes the segments and worker logs of dead owners of any run, never a live one's" do
    # Another run's files, as a VM killed with -9 (and its killed worker) leave them: one owner that
    # is dead, one that lives (a `cat` that exits when its port closes).
    run = System.get_env("SIDECAR_RUN_PREFIX", "") <> "foreign"
    {dead_text, 0} = System.cmd("sh", ["-c", "echo $$"])
    dead = String.to_integer(String.trim(dead_text))
    refute OsProcess.alive?(dead)
    cat = Port.open({:spawn_executable, System.find_executable("cat")}, [])
    {:os_pid, live} = Port.info(cat, :os_pid)

    made =
      for pid <- [dead, live] do
        seg = Shm.path("/sc-#{run}-#{pid}-#{Base.encode16(:rand.bytes(8), case: :lower)}")
        log = Path.join(System.tmp_dir!(), "sidecar-bridge-#{run}-#{pid}-somepool-0-1.log")
        :ok = File.write(seg, "x")
        :ok = File.write(log, "a worker's last words\n")
        {pid, [seg, log]}
      end

    try do
      {:ok, sup} = Sidecar.start_link(name: :sweeping_pool, workers: 1)
      Process.unlink(sup)
      :ok = Sidecar.stop(:sweeping_pool)

      for {pid, files} <- made, file <- files do
        assert File.exists?(file) == (pid == live), "#{file} (owner #{pid}, live #{pid == live})"
      end
    after
      for {_, files} <- made, file <- files, do: File.rm(file)
      Port.close(cat)
    end
  end

  test "an owner pid that is alive but started after the file was made is a reused pid: dead" do
    vm = String.to_integer(System.pid())
    now = System.os_time(:second)
    assert OsProcess.owner_alive?(vm, now)
    refute OsProcess.owner_alive?(vm, now - 10 * 86_400)
    {dead_text, 0} = System.cmd("sh", ["-c", "echo $$"])
    refute OsProcess.owner_alive?(String.to_integer(String.trim(dead_text)), now)
  end
end
