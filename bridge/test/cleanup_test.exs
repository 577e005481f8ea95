defmodule Sidecar.CleanupTest do
  # A pool of its own: after it stops, neither its workers nor any segment it made (or its workers
  # made) is left, crashes included.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.Tensor

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
    assert held.leases != []

    Process.unlink(sup)
    :ok = Sidecar.stop(:cleanup_pool)

    assert Enum.all?(pids, &(not Sidecar.Shm.alive?(&1)))
    {:shm, %{name: name}} = pinned.storage
    refute File.exists?(Sidecar.Shm.path(name))
    left = Enum.filter(run_files(), fn f -> Enum.any?(pids, &String.contains?(f, "-#{&1}-")) end)
    assert left == []
    assert {:error, %{kind: :invalid_argument}} = Sidecar.call(:cleanup_pool, "add", [1, 2])
  end
end
