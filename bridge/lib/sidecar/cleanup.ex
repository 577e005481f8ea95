defmodule Sidecar.Cleanup do
  @moduledoc """
  Nothing of the VM outlives it: its pools, their workers, its segments and its workers' logs.

    * When the application stops (`System.stop/1`, `:init.stop/0`, `Application.stop/1`, the end of
      a release) this process, which traps exits, stops every pool still running in `terminate/2`
      (its workers finish and exit, their logs and segments go); `Sidecar.Shm`, which stops after
      it, unlinks the VM's own segments.
    * The `elixir`/`mix` command line ends with `System.halt/1`, which stops no application: at the
      end of `mix run script.exs`, or after an uncaught exception in the script. A
      `System.at_exit/1` hook does the same cleanup first.
    * A VM killed with SIGKILL runs nothing: the next pool to start, in any VM, removes what dead
      owners left (`Sidecar.Shm.sweep_dead_owners/0`, `Sidecar.WorkerLog.sweep_dead_owners/0`).

  While it cleans up no new pool starts (`Sidecar.Pool` returns `:ignore`), so a supervisor that
  restarts a stopped pool does not spawn workers into a VM that is ending.
  """
  use GenServer
  require Logger

  alias Sidecar.{Shm, WorkerLog}

  @doc false
  @spec start_link(term) :: GenServer.on_start()
  def start_link(_opts), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  @doc false
  # Stopping the pools is bounded by their workers' shutdown; the application waits for it.
  @spec child_spec(term) :: Supervisor.child_spec()
  def child_spec(opts), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [opts]}, shutdown: :infinity}

  @doc false
  # Called by every pool as it starts (in its supervisor's init).
  @spec track_pool(pid) :: :ok
  def track_pool(pid), do: GenServer.call(__MODULE__, {:track, pid})

  @doc "True while the VM's cleanup runs: pools started meanwhile are ignored."
  @spec exiting?() :: boolean
  def exiting?, do: :persistent_term.get({__MODULE__, :exiting}, false)

  @doc """
  Stops every pool, unlinks the VM's segments and removes its workers' logs (the at-exit hook; safe
  to call when the application is not running).
  """
  @spec vm_exit() :: :ok
  def vm_exit do
    if Process.whereis(__MODULE__), do: GenServer.call(__MODULE__, :vm_exit, :infinity)
    :ok
  catch
    :exit, _ -> :ok
  end

  @impl true
  def init([]) do
    Process.flag(:trap_exit, true)
    :persistent_term.put({__MODULE__, :exiting}, false)

    # Once per VM: the application may be stopped and started again.
    unless :persistent_term.get({__MODULE__, :hook}, false) do
      System.at_exit(fn _status -> vm_exit() end)
      :persistent_term.put({__MODULE__, :hook}, true)
    end

    {:ok, %{pools: %{}}}
  end

  @impl true
  def handle_call({:track, pid}, _from, state) do
    pools = Map.put_new_lazy(state.pools, pid, fn -> Process.monitor(pid) end)
    {:reply, :ok, %{state | pools: pools}}
  end

  def handle_call(:vm_exit, _from, state) do
    clean_up(state)
    {:reply, :ok, %{state | pools: %{}}}
  end

  @impl true
  def handle_info({:DOWN, _ref, :process, pid, _reason}, state),
    do: {:noreply, %{state | pools: Map.delete(state.pools, pid)}}

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    clean_up(state)
    # The application is stopped; a later start may run pools again.
    :persistent_term.put({__MODULE__, :exiting}, false)
  end

  defp clean_up(state) do
    :persistent_term.put({__MODULE__, :exiting}, true)

    state.pools
    |> Map.keys()
    |> Enum.map(&Task.async(fn -> stop_pool(&1) end))
    |> Task.await_many(:infinity)

    Shm.free_all()
    WorkerLog.remove_vm_logs()
  end

  # A pool may be stopping already (its parent, a script's process, exited): wait until it is gone.
  defp stop_pool(pid) do
    ref = Process.monitor(pid)

    try do
      Supervisor.stop(pid, :shutdown, :infinity)
    catch
      :exit, _ -> :ok
    end

    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    end
  end
end
