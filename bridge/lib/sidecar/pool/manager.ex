defmodule Sidecar.Pool.Manager do
  @moduledoc false
  # The pool's memory across worker lives:
  #
  #   * when a slot may start a worker (`request_start/2`): at once after a first crash, then after
  #     the restart backoff; not at all while the circuit breaker is open (the worker is held until
  #     the probe, or until the breaker closes);
  #   * the circuit breaker (Sidecar.Breaker), fed with the crashes the work caused;
  #   * callers waiting for ready workers (`await/3`), answered by notification, never by polling:
  #     when a worker is ready, with `:circuit_open` when the breaker is open and no worker is
  #     ready, with the start failure itself when no worker could start (its stderr says why);
  #   * the resources the pool loaded (`put_recipe/2`, `recipes/1`): what a new worker replays
  #     before it serves (Sidecar.Resources), and the exits of recent workers (`exit_of/2`, what a
  #     session whose worker died reports);
  #   * workers whose process died without cleaning up: their OS process is stopped and their
  #     segments unlinked; at pool shutdown, what is left of the pool. At start it sweeps what dead
  #     VMs and workers left.
  use GenServer
  require Logger

  alias Sidecar.{Breaker, Error, OsProcess, Shm, Telemetry, WorkerLog}

  # A worker whose GenServer died without stopping its process: its stdin is closed, so it exits
  # within the worker's EOF grace; after this it is killed.
  @reap_after_ms 6_000

  @spec start_link(map) :: GenServer.on_start()
  def start_link(cfg), do: GenServer.start_link(__MODULE__, cfg, name: name(cfg.name))

  @spec name(atom) :: atom
  def name(pool), do: Module.concat(pool, Manager)

  @doc """
  May `slot` start a worker now? `{:start, delay_ms, consecutive_crashes, last_exit_at}`, or
  `{:hold, consecutive_crashes}` while the breaker is open (the manager sends `:spawn` later).
  """
  @spec request_start(atom, non_neg_integer) ::
          {:start, non_neg_integer, non_neg_integer, integer | nil} | {:hold, non_neg_integer}
  def request_start(pool, slot), do: GenServer.call(name(pool), {:request_start, slot, self()})

  @spec worker_spawned(atom, non_neg_integer, pid, non_neg_integer) :: :ok
  def worker_spawned(pool, slot, pid, os_pid), do: GenServer.cast(name(pool), {:spawned, slot, pid, os_pid})

  @spec worker_ready(atom, non_neg_integer, pid, non_neg_integer) :: :ok
  def worker_ready(pool, slot, pid, os_pid), do: GenServer.cast(name(pool), {:ready, slot, pid, os_pid})

  @doc """
  A worker process ended: `exit` has the classified `info`, the `error` its calls got, whether the
  work can have `caused` it, the `phase` (`:start` before its ready term) and whether the worker
  had proved itself (`healthy`: served a call, or lived `healthy_after_ms`).
  """
  @spec worker_exited(atom, non_neg_integer, pid, map) :: :ok
  def worker_exited(pool, slot, pid, exit), do: GenServer.cast(name(pool), {:exited, slot, pid, exit})

  @doc """
  Waits until `count` workers are ready. `mode` `:call` (a call looking for a worker) also ends
  the wait with `:circuit_open` while the breaker is open and no worker is ready. Either ends with
  the start failure when no worker could start. `timeout` in ms.
  """
  @spec await(atom, pos_integer, :call | :ready, non_neg_integer) :: :ok | {:error, Error.t()}
  def await(pool, count, mode, timeout) do
    GenServer.call(name(pool), {:await, count, mode, timeout}, timeout + 5_000)
  catch
    :exit, reason -> {:error, Error.new(:cancelled, "the pool #{inspect(pool)} is gone (#{inspect(reason)})")}
  end

  @doc """
  Remembers a resource recipe (`%{name:, loader:, kwargs:}`) for every later worker; the same
  name with another recipe is `{:error, old}`. Returns the recipes' version.
  """
  @spec put_recipe(atom, map) :: {:ok, non_neg_integer} | {:error, map}
  def put_recipe(pool, recipe), do: GenServer.call(name(pool), {:put_recipe, recipe})

  @doc "Forgets the recipe of `name`: `{:ok, recipe}` or `:error` when there was none."
  @spec drop_recipe(atom, String.t()) :: {:ok, map} | :error
  def drop_recipe(pool, name), do: GenServer.call(name(pool), {:drop_recipe, name})

  @doc "The recipes in load order, and their version (bumped by every change)."
  @spec recipes(atom) :: {non_neg_integer, [map]}
  def recipes(pool), do: GenServer.call(name(pool), :recipes)

  @doc "The crash error of a recent worker (its GenServer pid), or nil."
  @spec exit_of(atom, pid) :: Error.t() | nil
  def exit_of(pool, pid), do: GenServer.call(name(pool), {:exit_of, pid})

  @doc "The breaker's state and counts."
  @spec breaker(atom) :: map
  def breaker(pool), do: GenServer.call(name(pool), :breaker)

  # -- state -----------------------------------------------------------------------------------------

  @impl true
  def init(cfg) do
    Process.flag(:trap_exit, true)
    Registry.put_meta(cfg.registry, :config, Map.take(cfg, [:timeout, :max_attempts, :retry_backoff, :read, :workers]))
    Registry.put_meta(cfg.registry, :ops, %{})

    # What VMs and workers killed outright left behind, of any run (nothing of theirs ran at exit).
    segments = Shm.sweep_dead_owners()
    logs = WorkerLog.sweep_dead_owners()

    if segments + logs > 0,
      do:
        Logger.info(
          "sidecar pool #{inspect(cfg.name)}: removed #{segments} segments and #{logs} worker logs of dead processes"
        )

    {:ok,
     %{
       cfg: cfg,
       pool: cfg.name,
       breaker: Breaker.new(cfg.breaker),
       crashes: %{},
       exited_at: %{},
       ready: %{},
       held: %{},
       probe: nil,
       waiters: [],
       last_crash: nil,
       start_failure: nil,
       os_pids: %{},
       monitors: %{},
       recipes: [],
       recipes_version: 0,
       exits: %{}
     }}
  end

  @impl true
  def handle_call({:request_start, slot, pid}, _from, state) do
    state = monitor(state, pid)
    n = Map.get(state.crashes, slot, 0)
    start = {:start, backoff(n, state.cfg.restart_backoff), n, state.exited_at[slot]}

    case state.breaker.state do
      :closed ->
        {:reply, start, state}

      :half_open when state.probe == nil ->
        # The one start that tests whether workers can run again.
        {:reply, put_elem(start, 1, 0), %{state | probe: pid}}

      _ ->
        {:reply, {:hold, n}, %{state | held: Map.put(state.held, pid, slot)}}
    end
  end

  def handle_call({:await, count, mode, timeout}, from, state) do
    ref = make_ref()
    timer = Process.send_after(self(), {:await_timeout, ref}, timeout)
    waiter = %{ref: ref, from: from, count: count, mode: mode, timer: timer, timeout: timeout}
    {:noreply, answer_waiters(%{state | waiters: [waiter | state.waiters]})}
  end

  def handle_call({:put_recipe, %{name: name} = recipe}, _from, state) do
    case Enum.find(state.recipes, &(&1.name == name)) do
      nil ->
        v = state.recipes_version + 1
        {:reply, {:ok, v}, %{state | recipes: state.recipes ++ [recipe], recipes_version: v}}

      ^recipe ->
        {:reply, {:ok, state.recipes_version}, state}

      old ->
        {:reply, {:error, old}, state}
    end
  end

  def handle_call({:drop_recipe, name}, _from, state) do
    case Enum.split_with(state.recipes, &(&1.name == name)) do
      {[], _} ->
        {:reply, :error, state}

      {[old], rest} ->
        {:reply, {:ok, old}, %{state | recipes: rest, recipes_version: state.recipes_version + 1}}
    end
  end

  def handle_call(:recipes, _from, state), do: {:reply, {state.recipes_version, state.recipes}, state}

  def handle_call({:exit_of, pid}, _from, state), do: {:reply, state.exits[pid], state}

  def handle_call(:breaker, _from, state) do
    b = state.breaker
    now = now()

    {:reply,
     %{
       state: b.state,
       recent_failures: Breaker.recent_failures(b, now),
       threshold: b.threshold,
       window_ms: b.window_ms,
       cooldown_ms: b.cooldown_ms,
       retry_after_ms: Breaker.retry_after(b, now),
       opened_count: b.opened_count,
       held_slots: Enum.sort(Map.values(state.held))
     }, state}
  end

  # No delay for a first crash (a replacement should serve at once); then base * 2^(n-2), capped.
  defp backoff(n, _) when n <= 1, do: 0
  defp backoff(n, {base, max}), do: min(base * Integer.pow(2, min(n - 2, 30)), max)

  @impl true
  def handle_cast({:spawned, _slot, pid, os_pid}, state) do
    state = monitor(state, pid)
    {:noreply, %{state | os_pids: Map.put(state.os_pids, pid, os_pid)}}
  end

  def handle_cast({:ready, _slot, pid, os_pid}, state) do
    state = %{state | ready: Map.put(state.ready, pid, os_pid), os_pids: Map.put(state.os_pids, pid, os_pid)}
    state = if state.probe == pid, do: %{state | probe: nil}, else: state

    state =
      case Breaker.record_success(state.breaker) do
        {b, :closed} -> breaker_closed(%{state | breaker: b})
        {b, nil} -> %{state | breaker: b}
      end

    {:noreply, answer_waiters(%{state | start_failure: nil})}
  end

  def handle_cast({:exited, slot, pid, exit}, state) do
    now = now()
    # A worker that proved itself, or one killed from outside while it served (the work did not
    # cause it: nothing to back off from), restarts at once; crashes in a row back off.
    fresh = exit.healthy or (not exit.caused and exit.phase == :running)
    n = if fresh, do: 1, else: Map.get(state.crashes, slot, 0) + 1

    # Kept for sessions pinned to the dead worker (Sidecar.Session); the oldest go beyond 256.
    exits = if map_size(state.exits) >= 256, do: Map.new(Enum.drop(state.exits, 128)), else: state.exits

    state = %{
      state
      | exits: Map.put(exits, pid, exit.error),
        ready: Map.delete(state.ready, pid),
        crashes: Map.put(state.crashes, slot, n),
        exited_at: Map.put(state.exited_at, slot, System.monotonic_time()),
        probe: if(state.probe == pid, do: nil, else: state.probe),
        last_crash: if(exit.caused, do: exit.error, else: state.last_crash),
        start_failure: if(exit.phase == :start, do: exit.error, else: state.start_failure)
    }

    state =
      if exit.caused do
        case Breaker.record_failure(state.breaker, now) do
          {b, :opened} -> breaker_opened(%{state | breaker: b}, exit)
          {b, nil} -> %{state | breaker: b}
        end
      else
        state
      end

    {:noreply, answer_waiters(state)}
  end

  # -- breaker ---------------------------------------------------------------------------------------

  defp breaker_opened(state, exit) do
    b = state.breaker

    Logger.warning(
      "sidecar pool #{inspect(state.pool)}: circuit breaker open (#{Breaker.recent_failures(b, now())} crashes " <>
        "within #{b.window_ms} ms, the last: #{exit.error.message}); probing in #{b.cooldown_ms} ms"
    )

    Telemetry.execute([:sidecar, :pool, :breaker], %{crashes: Breaker.recent_failures(b, now())}, %{
      pool: state.pool,
      state: :open,
      classification: exit.error.classification
    })

    Process.send_after(self(), :probe, b.cooldown_ms)
    state
  end

  defp breaker_closed(state) do
    Logger.info("sidecar pool #{inspect(state.pool)}: circuit breaker closed")
    Telemetry.execute([:sidecar, :pool, :breaker], %{crashes: 0}, %{pool: state.pool, state: :closed})
    # Every slot that was held starts now, as after a first crash.
    for {pid, _slot} <- state.held, do: send(pid, :spawn)
    slots = Map.values(state.held)
    %{state | held: %{}, crashes: Map.merge(state.crashes, Map.new(slots, &{&1, 0}))}
  end

  @impl true
  def handle_info(:probe, state) do
    now = now()

    case Breaker.try_probe(state.breaker, now) do
      {b, true} ->
        Telemetry.execute([:sidecar, :pool, :breaker], %{crashes: Breaker.recent_failures(b, now)}, %{
          pool: state.pool,
          state: :half_open
        })

        state = %{state | breaker: b}

        case Enum.at(Map.to_list(state.held), 0) do
          nil ->
            # Nothing waits to start: every slot has a worker, the pool works.
            {b, :closed} = Breaker.record_success(b)
            {:noreply, answer_waiters(breaker_closed(%{state | breaker: b}))}

          {pid, _slot} ->
            send(pid, :spawn)
            {:noreply, %{state | probe: pid, held: Map.delete(state.held, pid)}}
        end

      {b, false} ->
        if b.state == :open, do: Process.send_after(self(), :probe, max(Breaker.retry_after(b, now), 1))
        {:noreply, %{state | breaker: b}}
    end
  end

  def handle_info({:await_timeout, ref}, state) do
    case Enum.split_with(state.waiters, &(&1.ref == ref)) do
      {[w], rest} ->
        GenServer.reply(w.from, {:error, timeout_error(state, w)})
        {:noreply, %{state | waiters: rest}}

      {[], _} ->
        {:noreply, state}
    end
  end

  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    # The worker process is gone; normally it cleaned up itself. If it was killed outright, its
    # port closed and its OS process exits on stdin EOF; make sure a little later.
    {os_pid, os_pids} = Map.pop(state.os_pids, pid)
    if os_pid, do: Process.send_after(self(), {:reap, os_pid}, @reap_after_ms)

    state = %{
      state
      | os_pids: os_pids,
        monitors: Map.delete(state.monitors, pid),
        ready: Map.delete(state.ready, pid),
        held: Map.delete(state.held, pid),
        probe: if(state.probe == pid, do: nil, else: state.probe)
    }

    {:noreply, answer_waiters(state)}
  end

  def handle_info({:reap, os_pid}, state) do
    # A spare's process handed over to a replacement belongs to that one now: not to reap.
    unless os_pid in Map.values(state.os_pids), do: reap(os_pid)
    {:noreply, state}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    # Workers stop before us (rest_for_one, reverse start order); this catches anything left.
    Enum.each(state.os_pids, fn {_, os_pid} -> reap(os_pid) end)
    Shm.free_pool(state.pool)
  end

  defp reap(os_pid) do
    if OsProcess.alive?(os_pid) do
      Logger.warning("sidecar worker #{os_pid} outlived its owner; sending SIGKILL")
      OsProcess.signal(os_pid, :kill)
    end

    Shm.unlink_os_pid(os_pid)
  end

  # -- waiters ---------------------------------------------------------------------------------------

  defp answer_waiters(state) do
    {done, waiting} = Enum.split_with(state.waiters, &(answer(state, &1) != nil))

    for w <- done do
      Process.cancel_timer(w.timer)
      GenServer.reply(w.from, answer(state, w))
    end

    %{state | waiters: waiting}
  end

  defp answer(state, w) do
    ready = map_size(state.ready)

    cond do
      ready >= w.count -> :ok
      ready == 0 and w.mode == :call and state.breaker.state != :closed -> {:error, circuit_open_error(state)}
      ready == 0 and state.start_failure != nil -> {:error, start_failure_error(state)}
      true -> nil
    end
  end

  defp circuit_open_error(state) do
    b = state.breaker
    now = now()

    last =
      case state.last_crash do
        %Error{} = e -> Map.take(e, [:classification, :exit_code, :signal, :pid, :stderr_tail])
        nil -> %{}
      end

    text = if state.last_crash, do: "; last crash: #{state.last_crash.message}", else: ""

    struct(
      Error.new(
        :circuit_open,
        "circuit breaker of #{inspect(state.pool)} #{b.state} after #{Breaker.recent_failures(b, now)} worker " <>
          "crashes within #{b.window_ms} ms and no worker is ready; next probe in #{Breaker.retry_after(b, now)} ms" <>
          text
      ),
      last
    )
  end

  defp start_failure_error(state) do
    e = state.start_failure
    %{e | message: "no worker of #{inspect(state.pool)} could start: #{e.message}"}
  end

  defp timeout_error(state, w) do
    base = "#{w.count} worker(s) of #{inspect(state.pool)} not ready within #{w.timeout} ms"

    case state.start_failure || state.last_crash do
      %Error{} = e -> %{e | kind: :cancelled, message: base <> "; the last start failed: #{e.message}"}
      nil -> Error.new(:cancelled, base)
    end
  end

  defp monitor(state, pid) do
    if Map.has_key?(state.monitors, pid),
      do: state,
      else: %{state | monitors: Map.put(state.monitors, pid, Process.monitor(pid))}
  end

  defp now, do: System.monotonic_time(:millisecond)
end
