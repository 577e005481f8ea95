defmodule Sidecar.Pool.Manager do
  @moduledoc false
  # Owns the pool's ETS table (which callers read to route without a process hop) and the crash
  # history that sets restart backoff; watches every worker process so that a worker killed without
  # running its cleanup still has its OS process stopped and its segments unlinked; at pool shutdown
  # it unlinks what is left of the pool. At start it sweeps what dead VMs and workers left.
  #
  # Table rows:
  #   {{:worker, slot}, pid, os_pid, counter}   a ready worker; counter = calls in flight
  #   {{:op, name}, idempotent?}                 from the workers' ready terms
  #   {:config, map}                             call defaults
  use GenServer
  require Logger

  alias Sidecar.{Shm, WorkerLog}

  def start_link(cfg), do: GenServer.start_link(__MODULE__, cfg, name: name(cfg.name))

  def name(pool), do: Module.concat(pool, Manager)

  @doc "How many times in a row `slot` crashed without a healthy run in between."
  def consecutive_crashes(pool, slot), do: GenServer.call(name(pool), {:crashes, slot})

  def worker_spawned(pool, slot, pid, os_pid), do: GenServer.cast(name(pool), {:spawned, slot, pid, os_pid})

  def worker_crashed(pool, slot, healthy?), do: GenServer.cast(name(pool), {:crashed, slot, healthy?})

  @impl true
  def init(cfg) do
    Process.flag(:trap_exit, true)
    table = :ets.new(cfg.name, [:set, :public, :named_table, read_concurrency: true, write_concurrency: true])

    :ets.insert(
      table,
      {:config, Map.take(cfg, [:timeout, :max_attempts, :retry_backoff_ms, :read, :workers])}
    )

    # What VMs and workers killed outright left behind, of any run (nothing of theirs ran at exit).
    segments = Shm.sweep_dead_owners()
    logs = WorkerLog.sweep_dead_owners()

    if segments + logs > 0,
      do:
        Logger.info(
          "sidecar pool #{inspect(cfg.name)}: removed #{segments} segments and #{logs} worker logs of dead processes"
        )

    {:ok, %{cfg: cfg, crashes: %{}, os_pids: %{}, monitors: %{}}}
  end

  @impl true
  def handle_call({:crashes, slot}, _from, state), do: {:reply, Map.get(state.crashes, slot, 0), state}

  @impl true
  def handle_cast({:spawned, _slot, pid, os_pid}, state) do
    monitors =
      if Map.has_key?(state.monitors, pid),
        do: state.monitors,
        else: Map.put(state.monitors, pid, Process.monitor(pid))

    {:noreply, %{state | os_pids: Map.put(state.os_pids, pid, os_pid), monitors: monitors}}
  end

  def handle_cast({:crashed, slot, healthy?}, state) do
    n = if healthy?, do: 1, else: Map.get(state.crashes, slot, 0) + 1
    {:noreply, %{state | crashes: Map.put(state.crashes, slot, n)}}
  end

  @impl true
  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    # The worker process is gone; normally it cleaned up itself. If it was killed outright, its
    # port closed and the OS process exits on stdin EOF; make sure, then unlink its segments.
    {os_pid, os_pids} = Map.pop(state.os_pids, pid)
    :ets.match_delete(state.cfg.name, {{:worker, :_}, pid, :_, :_})
    if os_pid, do: Sidecar.Worker.ensure_stopped(os_pid, 2_000)
    {:noreply, %{state | os_pids: os_pids, monitors: Map.delete(state.monitors, pid)}}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    # Workers stop before us (rest_for_one, reverse start order); this catches anything left.
    Enum.each(state.os_pids, fn {_, os_pid} -> Sidecar.Worker.ensure_stopped(os_pid, 2_000) end)
    Shm.free_pool(state.cfg.name)
  end
end
