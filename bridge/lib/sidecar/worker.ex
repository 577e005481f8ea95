defmodule Sidecar.Worker do
  @moduledoc """
  One sidecar worker: a GenServer that owns a Port to a process speaking the port protocol
  (`sidecar serve --stdio`), either forked from the pool's template (the Port runs
  `priv/sidecar_launch`, which hands its pipes to the fork) or started cold (`python -m sidecar`).

  Frames are `{:packet, 4}` External Term Format terms (see `sidecar/worker/stdio_server.py`),
  decoded by `Sidecar.Frame` (no atom is ever created from them). Each request gets an id; many can
  be in flight, replies are matched by id and handed to the waiting caller. The worker is routable
  (registered under `:ready` in the pool's Registry) once its `{:ready, ...}` term arrives.

  Results: with the NIF loaded and `read: true`, each tensor output in the worker's segments is
  mapped here and handed to the caller as a binary that *is* the mapping; the call's lease is given
  back to the sidecar when the last of those binaries is garbage collected (the NIF tells this
  process). A lease that binaries still show is never released early, even on `Sidecar.release/1`.

  Health: a ready worker is pinged every `health.interval_ms`; after `health.failures` unanswered
  pings in a row (each `health.timeout_ms`) it is killed and classified `:unresponsive`.

  When the OS process exits, every call in flight gets a `:worker_crashed` error with the
  classified exit and the last lines of its stderr, the worker's segments are unlinked, the
  manager is told (restart backoff, circuit breaker), and this process stops so that its supervisor
  starts a replacement.
  """
  use GenServer
  require Logger

  alias Sidecar.{Error, Exit, Frame, Native, OsProcess, Pool.Manager, Shm, Telemetry, Template, WorkerLog}

  # sidecar_launch: nothing was started (the template is gone or refused); start cold instead.
  @launch_not_started 75

  # -- API (used by Sidecar) -----------------------------------------------------------------------

  @spec start_link(map) :: GenServer.on_start()
  def start_link(cfg), do: GenServer.start_link(__MODULE__, cfg)

  @spec child_spec(map) :: Supervisor.child_spec()
  def child_spec(cfg) do
    %{
      id: {__MODULE__, cfg.slot},
      start: {__MODULE__, :start_link, [cfg]},
      restart: :permanent,
      shutdown: cfg.shutdown_grace_ms + 3_000
    }
  end

  @typedoc "How a call's tensor outputs come back: mapped as binaries, or as the worker's descriptors."
  @type read :: :zero_copy | :raw

  @doc false
  # Sends a request and waits for its reply; `{:cancel, id}` goes to the worker when the caller
  # gives up. `keep` (the inputs' binaries and mappings) is held until the worker answered, so
  # that nothing the worker reads is garbage collected under it.
  @spec request(pid, tuple, timeout, read, term) :: {:ok, term, non_neg_integer} | {:error, term}
  def request(pid, req, timeout, read \\ :raw, keep \\ []) do
    id = System.unique_integer([:positive])

    try do
      GenServer.call(pid, {:request, id, req, read, keep}, timeout)
    catch
      :exit, {:timeout, _} ->
        GenServer.cast(pid, {:cancel, id})
        {:error, :timeout}

      :exit, {reason, _} ->
        {:error, {:down, reason}}
    end
  end

  @doc false
  # Starts a stream (`{:stream, nil, op, inputs, attrs, opts}`) whose frames go to `consumer` as
  # `{:sidecar_chunk, id, chunk}` and, last, `{:sidecar_stream_end, id, {:ok, result} | {:error, err}}`.
  # The worker process monitors `consumer`: when it exits, the stream is cancelled in the sidecar
  # (the generator is closed). `keep` is held until the stream ends, as for a call.
  @spec open_stream(pid, tuple, pid, term) :: {:ok, pos_integer} | {:error, term}
  def open_stream(pid, req, consumer, keep) do
    id = System.unique_integer([:positive])
    GenServer.call(pid, {:stream, id, req, consumer, keep})
  catch
    :exit, {reason, _} -> {:error, {:down, reason}}
  end

  @doc false
  # Credit for a stream: its consumer took `n` more chunks (`{:ack, id, n}` to the sidecar).
  @spec ack(pid, pos_integer, pos_integer) :: :ok
  def ack(pid, id, n), do: GenServer.cast(pid, {:ack, id, n})

  @doc false
  # The consumer is done with a stream before its end: cancelled in the sidecar.
  @spec cancel(pid, pos_integer) :: :ok
  def cancel(pid, id), do: GenServer.cast(pid, {:cancel, id})

  @doc false
  # The caller is done with these leases. One that binaries still show is released by their GC.
  @spec release(pid, [String.t()]) :: :ok
  def release(pid, ids) when is_list(ids), do: GenServer.cast(pid, {:release, ids})

  @doc false
  # A binary that is the bytes of a leased output (no copy): the lease stays held while it lives.
  @spec view(pid, map, [String.t()]) :: {:ok, binary} | {:error, Error.t()}
  def view(pid, shm, lease_ids) do
    GenServer.call(pid, {:view, shm, lease_ids})
  catch
    :exit, _ -> {:error, Error.new(:invalid_tensor_ref, "the worker that holds #{shm.name} is gone", field: "name")}
  end

  # -- lifecycle -----------------------------------------------------------------------------------

  @impl true
  def init(cfg) do
    Process.flag(:trap_exit, true)

    state = %{
      cfg: cfg,
      pool: cfg.name,
      slot: cfg.slot,
      crashes: 0,
      last_exit_at: nil,
      port: nil,
      port_pid: nil,
      os_pid: nil,
      via: nil,
      cold_only: not cfg.template,
      status: :waiting,
      pending: %{},
      counter: nil,
      info: nil,
      log: nil,
      spawned_at: nil,
      ready_at: nil,
      start_timer: nil,
      kill_reason: nil,
      oom_kills: nil,
      served: false,
      leases: %{},
      groups: %{},
      health_failures: 0,
      # the pool's resources this worker loaded before it served, and since when it restores them
      restored: MapSet.new(),
      restoring_since: nil,
      health: nil
    }

    {:ok, state, {:continue, :start}}
  end

  @impl true
  # The views this process made went to a caller; their last reference here is on our young heap,
  # and a lease is released only when every reference is gone: collect it now, not whenever this
  # mostly idle process would next collect.
  def handle_continue(:drop_views, state) do
    :erlang.garbage_collect(self(), type: :minor)
    {:noreply, state}
  end

  def handle_continue(:start, state) do
    case Manager.request_start(state.pool, state.slot) do
      {:start, delay, crashes, last_exit_at} ->
        state = %{state | crashes: crashes, last_exit_at: last_exit_at}

        if crashes > 0, do: restart_event(state, delay, false)

        cond do
          delay > 0 ->
            Process.send_after(self(), :spawn, delay)
            {:noreply, state}

          crashes > 0 and not spare?(state) ->
            # A replacement: a warm spare serves at once, else a new worker starts.
            case adopt_spare(state) do
              {:ok, state} -> {:noreply, state}
              :none -> {:noreply, spawn_worker(state)}
            end

          true ->
            {:noreply, spawn_worker(state)}
        end

      {:hold, crashes} ->
        # The circuit breaker is open: the manager sends :spawn for the probe or when it closes.
        state = %{state | crashes: crashes, status: :held}
        restart_event(state, 0, true)
        {:noreply, state}
    end
  end

  defp restart_event(state, delay, held) do
    Telemetry.execute([:sidecar, :pool, :restart], %{delay_ms: delay}, %{
      pool: state.pool,
      slot: state.slot,
      consecutive_crashes: state.crashes,
      held: held
    })
  end

  defp spawn_worker(%{cold_only: true} = state), do: open_port(state, :cold)

  defp spawn_worker(state) do
    case Template.launch(state.pool) do
      :wait -> %{state | status: :waiting_template}
      mode -> open_port(state, mode)
    end
  end

  defp open_port(%{cfg: cfg} = state, mode) do
    label = with {:spare, i} <- state.slot, do: "spare#{i}"
    log = if cfg.stderr == :capture, do: WorkerLog.new_path(state.pool, label), else: nil

    case command(cfg, mode, log) do
      {:ok, exe, args} ->
        env = Sidecar.Pool.port_env(worker_env(cfg.env))
        oom_kills = Exit.oom_kills()

        try do
          port =
            Port.open({:spawn_executable, exe}, [
              :binary,
              {:packet, 4},
              :exit_status,
              :use_stdio,
              :hide,
              {:args, args},
              {:env, env}
            ])

          {:os_pid, port_pid} = Port.info(port, :os_pid)
          via = if mode == :cold, do: :cold, else: :fork
          # A cold worker is the port's process; a forked one reports its pid in its ready term.
          os_pid = if via == :cold, do: port_pid, else: nil
          Manager.worker_spawned(state.pool, state.slot, self(), port_pid)
          timer = Process.send_after(self(), :start_timeout, cfg.start_timeout)

          %{
            state
            | port: port,
              port_pid: port_pid,
              os_pid: os_pid,
              via: via,
              log: log,
              status: :starting,
              spawned_at: System.monotonic_time(),
              start_timer: timer,
              oom_kills: oom_kills
          }
        rescue
          e in ErlangError -> spawn_failed(state, "cannot start #{exe}: #{inspect(e.original)}")
        end

      {:error, why} ->
        spawn_failed(state, why)
    end
  end

  defp spawn_failed(state, why) do
    send(self(), {:spawn_failed, why})
    %{state | status: :failed}
  end

  defp command(cfg, mode, log) do
    python = cfg.python
    serve =
      ["serve", "--stdio", "--run-id", Shm.run_id(), "--device", to_string(cfg.device)] ++
        Enum.flat_map(cfg.ops, &["--ops", &1]) ++
        if(cfg.debug_ops, do: ["--debug-ops"], else: []) ++ cfg.args

    argv =
      case mode do
        {:fork, launcher, socket} -> {:ok, [launcher, socket | serve]}
        :cold -> with {:ok, exe} <- executable(python), do: {:ok, [exe, "-m", "sidecar" | serve]}
      end

    with {:ok, [exe | args] = command} <- argv do
      if log do
        {sh, sh_args} = WorkerLog.wrap(log, command)
        {:ok, sh, sh_args}
      else
        {:ok, exe, args}
      end
    end
  end

  # A native crash then leaves a Python traceback in the worker's stderr tail (faulthandler), as
  # in the Python pool; the pool's `env:` and the VM's environment decide otherwise.
  defp worker_env(env) do
    if List.keymember?(env, "PYTHONFAULTHANDLER", 0) or System.get_env("PYTHONFAULTHANDLER"),
      do: env,
      else: [{"PYTHONFAULTHANDLER", "1"} | env]
  end

  defp executable(python) do
    found = if String.contains?(python, "/"), do: python, else: System.find_executable(python)

    cond do
      found == nil -> {:error, "the python executable #{inspect(python)} is not on the PATH"}
      not File.exists?(found) -> {:error, "the python executable #{found} does not exist"}
      true -> {:ok, found}
    end
  end

  # -- requests ------------------------------------------------------------------------------------

  @impl true
  def handle_call({:request, id, req, read, keep}, from, %{status: :ready} = state) do
    send_frame(state, put_elem(req, 1, id))
    {:noreply, put_in(state.pending[id], {:call, from, read, keep})}
  rescue
    # The port closed under us (its exit status is on the way): the caller routes elsewhere.
    ArgumentError -> {:reply, {:error, :not_ready}, state}
  end

  def handle_call({:request, _id, _req, _read, _keep}, _from, state), do: {:reply, {:error, :not_ready}, state}

  def handle_call({:stream, id, req, consumer, keep}, _from, %{status: :ready} = state) do
    send_frame(state, put_elem(req, 1, id))
    ref = Process.monitor(consumer)
    {:reply, {:ok, id}, put_in(state.pending[id], {:stream, consumer, ref, keep})}
  rescue
    ArgumentError -> {:reply, {:error, :not_ready}, state}
  end

  def handle_call({:stream, _id, _req, _consumer, _keep}, _from, state), do: {:reply, {:error, :not_ready}, state}

  def handle_call({:handover, to}, _from, %{slot: {:spare, _}, status: :ready, port: port} = state) do
    Registry.unregister(state.cfg.registry, :spare)
    true = Port.connect(port, to)
    Process.unlink(port)
    taken = Map.take(state, [:port, :port_pid, :os_pid, :info, :log, :spawned_at, :ready_at, :oom_kills])
    # Nothing of the worker is ours any more: terminate/2 must neither stop it nor remove its log.
    {:stop, {:shutdown, :handed_over}, {:ok, taken}, %{state | port: nil, log: nil}}
  rescue
    ArgumentError -> {:reply, :not_ready, state}
  end

  def handle_call({:handover, _to}, _from, state), do: {:reply, :not_ready, state}

  def handle_call({:view, shm, ids}, _from, state) do
    case map_outputs(state, [shm], ids, false) do
      {:ok, [bin], state} -> {:reply, {:ok, bin}, state, {:continue, :drop_views}}
      {:error, err, state} -> {:reply, {:error, err}, state}
    end
  end

  def handle_call(:info, _from, state) do
    {:reply,
     %{
       slot: state.slot,
       pid: self(),
       os_pid: state.os_pid,
       status: if(spare?(state) and state.status == :ready, do: :spare, else: state.status),
       via: state.via,
       in_flight: Enum.count(state.pending, &(match?({_, {:call, _, _, _}}, &1) or match?({_, {:stream, _, _, _}}, &1))),
       leases_held: map_size(state.leases),
       consecutive_crashes: state.crashes,
       health_failures: state.health_failures,
       health: state.health,
       device: state.info && state.info[:device],
       stderr_log: state.log
     }, state}
  end

  @impl true
  def handle_cast({:cancel, id}, state) do
    case state.pending do
      %{^id => {:call, _from, _read, keep}} ->
        {_, state} = internal(state, {:cancel, id}, nil)
        # The worker may still read the inputs until it answers: keep them until then.
        {:noreply, put_in(state.pending[id], {:abandoned, keep})}

      %{^id => {:stream, _consumer, ref, keep}} ->
        Process.demonitor(ref, [:flush])
        {:noreply, abandon_stream(state, id, keep)}

      _ ->
        {:noreply, state}
    end
  end

  def handle_cast({:ack, id, n}, state) do
    if match?(%{^id => {:stream, _, _, _}}, state.pending), do: internal(state, {:ack, id, n}, nil)
    {:noreply, state}
  end

  def handle_cast({:release, ids}, state), do: {:noreply, release_leases(state, ids, :explicit)}

  # Sends a request of the pool's own (its reply is handled by `kind`; nil: a cancel, no reply).
  # The stream's consumer left (or cancelled): the sidecar closes the generator and reclaims the
  # chunks not acknowledged; the inputs stay held until the sidecar's final answer.
  defp abandon_stream(state, id, keep) do
    {_, state} = internal(state, {:cancel, id}, nil)
    put_in(state.pending[id], {:abandoned, keep})
  end

  defp internal(state, {:ack, _, _} = req, nil) do
    send_frame(state, req)
    {nil, state}
  rescue
    ArgumentError -> {nil, state}
  end

  defp internal(state, {:cancel, _} = req, nil) do
    send_frame(state, req)
    {nil, state}
  rescue
    ArgumentError -> {nil, state}
  end

  defp internal(state, req, kind) do
    id = System.unique_integer([:positive])
    send_frame(state, put_elem(req, 1, id))
    {id, put_in(state.pending[id], kind)}
  rescue
    ArgumentError -> {nil, state}
  end

  # Raises ArgumentError when the port is closed (its exit status is on the way).
  defp send_frame(%{port: port}, term), do: Port.command(port, :erlang.term_to_binary(term))

  # -- leases ---------------------------------------------------------------------------------------

  # state.leases: lease id => %{groups: MapSet of view-group refs, auto: bool, released: bool}
  #   auto: the pool released it for the caller (a zero-copy result): gone once its views are.
  # state.groups: view-group ref => lease ids (one group per lease_views call).

  defp release_leases(state, ids, reason) do
    {now, state} =
      Enum.reduce(ids, {[], state}, fn id, {now, st} ->
        case st.leases[id] do
          # Binaries still show it: released when they are collected.
          %{groups: groups} = l ->
            if MapSet.size(groups) > 0,
              do: {now, put_in(st.leases[id], %{l | released: true})},
              else: {[id | now], %{st | leases: Map.delete(st.leases, id)}}

          _ ->
            {[id | now], %{st | leases: Map.delete(st.leases, id)}}
        end
      end)

    send_release(state, Enum.reverse(now), reason)
  end

  defp send_release(state, [], _reason), do: state
  defp send_release(%{status: :ready} = state, ids, reason), do: elem(internal(state, {:release, 0, ids}, {:release, ids, reason}), 1)
  # A worker that is not running holds no leases any more (its segments went with it).
  defp send_release(state, _ids, _reason), do: state

  defp views_collected(state, ref) do
    {ids, groups} = Map.pop(state.groups, ref, [])

    {free, leases} =
      Enum.reduce(ids, {[], state.leases}, fn id, {free, leases} ->
        case leases do
          %{^id => l} ->
            l = %{l | groups: MapSet.delete(l.groups, ref)}

            if MapSet.size(l.groups) == 0 and (l.auto or l.released),
              do: {[id | free], Map.delete(leases, id)},
              else: {free, Map.put(leases, id, l)}

          _ ->
            {free, leases}
        end
      end)

    send_release(%{state | groups: groups, leases: leases}, Enum.reverse(free), :gc)
  end

  # Maps `shms` (descriptors of this worker's segments) as binaries of one view group, held by
  # `ids`; `auto` releases the leases once the views are collected.
  defp map_outputs(state, shms, ids, auto) do
    ref = make_ref()

    with {:ok, ranges} <- ranges(shms),
         {:ok, bins} <- lease_views(ranges, ref) do
      state = put_in(state.groups[ref], ids)

      leases =
        Enum.reduce(ids, state.leases, fn id, acc ->
          l = Map.get(acc, id, %{groups: MapSet.new(), auto: auto, released: false})
          Map.put(acc, id, %{l | groups: MapSet.put(l.groups, ref), auto: l.auto or auto})
        end)

      {:ok, bins, %{state | leases: leases}}
    else
      {:error, err} -> {:error, err, state}
    end
  end

  # The NIF sends {:sidecar_views_collected, ref} here once the last of these binaries is collected.
  defp lease_views(ranges, ref) do
    case Native.lease_views(self(), {:sidecar_views_collected, ref}, ranges) do
      {:ok, bins} -> {:ok, bins}
      {:error, reason} -> {:error, Error.new(:invalid_tensor_ref, "cannot map a worker output: #{inspect(reason)}")}
    end
  end

  # Opens each segment once; checks its inode (a re-created name is another segment) and bounds.
  defp ranges(shms) do
    Enum.reduce_while(shms, {:ok, [], %{}}, fn %{name: name, offset: off, nbytes: n} = shm, {:ok, acc, open} ->
      with {:ok, seg, size, inode} <- Map.get_lazy(open, name, fn -> Native.open(name, false) end),
           :ok <- same_inode(shm, inode, name),
           true <- off + n <= size || {:error, {:bounds, name}} do
        {:cont, {:ok, [{seg, off, n} | acc], Map.put(open, name, {:ok, seg, size, inode})}}
      else
        {:error, reason} ->
          {:halt, {:error, Error.new(:invalid_tensor_ref, "worker output #{name} cannot be mapped: #{inspect(reason)}", field: "name")}}
      end
    end)
    |> case do
      {:ok, acc, _} -> {:ok, Enum.reverse(acc)}
      err -> err
    end
  end

  defp same_inode(%{inode: want}, got, _name) when is_integer(want) and want > 0 and want != got,
    do: {:error, {:inode_changed, want, got}}

  defp same_inode(_, _, _), do: :ok

  # The worker's own output segments in a result (`out:` destinations are the VM's, not these).
  defp own_outputs(term, prefix) do
    case term do
      {:tensor, %{shm: %{name: name} = shm}} when is_binary(name) ->
        if String.starts_with?(name, prefix), do: [shm], else: []

      list when is_list(list) ->
        Enum.flat_map(list, &own_outputs(&1, prefix))

      %{} = map when not is_struct(map) ->
        Enum.flat_map(Map.values(map), &own_outputs(&1, prefix))

      _ ->
        []
    end
  end

  # Replaces the worker-segment descriptors in `term` by the mapped binaries, in the same order.
  defp put_binaries(term, bins, prefix) do
    case term do
      {:tensor, %{shm: %{name: name}} = t} when is_binary(name) ->
        if String.starts_with?(name, prefix) do
          [bin | rest] = bins
          {{:tensor, t |> Map.delete(:shm) |> Map.put(:data, bin)}, rest}
        else
          {term, bins}
        end

      list when is_list(list) ->
        Enum.map_reduce(list, bins, &put_binaries(&1, &2, prefix))

      %{} = map when not is_struct(map) ->
        {pairs, rest} = Enum.map_reduce(map, bins, fn {k, v}, acc ->
          {v, acc} = put_binaries(v, acc, prefix)
          {{k, v}, acc}
        end)

        {Map.new(pairs), rest}

      _ ->
        {term, bins}
    end
  end

  # A result with leases, read zero-copy: its tensors become binaries of the mappings.
  defp zero_copy(%{outputs: outputs, leases: [_ | _] = ids} = result, state) do
    prefix = Shm.owner_prefix(state.os_pid)

    case own_outputs(outputs, prefix) do
      [] ->
        {:ok, result, release_leases(state, ids, :unused)}

      shms ->
        case map_outputs(state, shms, ids, true) do
          {:ok, bins, state} ->
            {outputs, []} = put_binaries(outputs, bins, prefix)
            {:ok, result |> Map.put(:outputs, outputs) |> Map.put(:leases, []) |> Map.put(:gc_leases, ids), state}

          {:error, err, state} ->
            {:error, err, release_leases(state, ids, :gc)}
        end
    end
  end

  defp zero_copy(result, state), do: {:ok, result, state}

  # -- port messages -------------------------------------------------------------------------------

  @impl true
  def handle_info({port, {:data, bin}}, %{port: port} = state) do
    case Frame.decode(bin) do
      {:ok, term} ->
        groups = map_size(state.groups)
        state = handle_term(term, state)
        if map_size(state.groups) > groups, do: {:noreply, state, {:continue, :drop_views}}, else: {:noreply, state}

      {:error, _} ->
        Logger.warning("sidecar worker #{state.os_pid} sent a malformed frame (#{byte_size(bin)} bytes)")
        {:noreply, state}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state), do: exited(status, state)

  def handle_info({:sidecar_views_collected, ref}, state), do: {:noreply, views_collected(state, ref)}

  def handle_info(:spawn, %{status: status} = state) when status in [:waiting, :held],
    do: {:noreply, spawn_worker(state)}

  def handle_info({:sidecar_template, _status}, %{status: :waiting_template} = state),
    do: {:noreply, spawn_worker(state)}

  def handle_info({:spawn_failed, why}, state) do
    info = %{classification: :spawn_failed, exit_code: nil, signal: nil}
    err = Error.new(:worker_crashed, "sidecar worker #{inspect(state.pool)}/#{state.slot} #{Exit.describe(info)}: #{why}",
      classification: :spawn_failed)
    Logger.error(err.message)
    crash_event(state, info, [], true)
    Manager.worker_exited(state.pool, state.slot, self(), %{error: err, caused: true, phase: :start, healthy: false})
    {:stop, {:shutdown, {:spawn_failed, why}}, state}
  end

  def handle_info(:start_timeout, %{status: :restoring} = state) do
    Logger.error("sidecar worker #{state.os_pid} did not restore the pool's resources in #{state.cfg.start_timeout} ms; killing it")
    kill(state)
    {:noreply, %{state | kill_reason: :restore_failed}}
  end

  def handle_info(:start_timeout, %{status: :starting} = state) do
    Logger.error("sidecar worker #{state.os_pid || state.port_pid} sent no ready term in #{state.cfg.start_timeout} ms; killing it")
    kill(state)
    {:noreply, %{state | kill_reason: :start_timeout}}
  end

  def handle_info(:health_tick, %{status: :ready} = state) do
    %{interval_ms: interval, timeout_ms: timeout} = state.cfg.health
    Process.send_after(self(), :health_tick, interval)
    {id, state} = internal(state, {:release, 0, []}, {:ping, cpu_now(state), System.monotonic_time(:millisecond)})
    if id, do: Process.send_after(self(), {:ping_timeout, id}, timeout)
    {:noreply, state}
  end

  def handle_info({:ping_timeout, id}, %{status: :ready} = state) do
    case Map.pop(state.pending, id) do
      {{:ping, cpu_before, sent_at}, pending} ->
        busy = busy?(cpu_before, cpu_now(state), System.monotonic_time(:millisecond) - sent_at)
        # BUSY: no answer, but the process computed meanwhile (an op holding the GIL in C):
        # alive and working, never killed for it.
        failures = if busy, do: 0, else: state.health_failures + 1
        state = %{state | pending: pending, health_failures: failures, health: if(busy, do: :busy, else: :no_answer)}

        if failures >= state.cfg.health.failures do
          Logger.warning("sidecar worker #{state.os_pid} missed #{failures} health checks in a row; killing it")
          kill(state)
          {:noreply, %{state | kill_reason: :unresponsive}}
        else
          {:noreply, state}
        end

      {_, _} ->
        {:noreply, state}
    end
  end

  def handle_info({:DOWN, ref, :process, _pid, _reason}, state) do
    case Enum.find(state.pending, &match?({_, {:stream, _, ^ref, _}}, &1)) do
      {id, {:stream, _, _, keep}} -> {:noreply, abandon_stream(state, id, keep)}
      nil -> {:noreply, state}
    end
  end

  def handle_info({:EXIT, port, _reason}, state) when is_port(port), do: {:noreply, state}
  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_msg, state), do: {:noreply, state}

  defp handle_term({:ready, os_pid, info}, state) when is_integer(os_pid) and is_map(info) do
    state = %{state | os_pid: os_pid, info: info, ready_at: System.monotonic_time()}

    state =
      if state.cfg.telemetry,
        do: elem(internal(state, {:subscribe, 0, %{memory_interval_s: state.cfg.memory_interval_s}}, :internal), 1),
        else: state

    restore(state)
  end

  defp handle_term({:chunk, id, chunk}, state) do
    case state.pending do
      %{^id => {:stream, consumer, _ref, _keep}} -> send(consumer, {:sidecar_chunk, id, chunk})
      _ -> :ok  # a chunk of a cancelled stream: the sidecar reclaims its lease
    end

    state
  end

  defp handle_term({tag, id, payload}, state) when tag in [:ok, :error] do
    {entry, pending} = Map.pop(state.pending, id)
    state = %{state | pending: pending}

    case entry do
      {:stream, consumer, ref, _keep} ->
        Process.demonitor(ref, [:flush])
        send(consumer, {:sidecar_stream_end, id, if(tag == :ok, do: {:ok, payload}, else: {:error, Error.from_term(payload)})})
        %{state | served: true}

      {:call, from, read, _keep} ->
        {reply, state} = reply(tag, payload, read, state)
        GenServer.reply(from, reply)
        state

      {:abandoned, _keep} ->
        # The caller gave up: hand back what the call leased, nobody will.
        with :ok <- tag, %{leases: [_ | _] = ids} <- payload, do: send_release(state, ids, :abandoned), else: (_ -> state)

      {:ping, _, _} ->
        %{state | health_failures: 0, health: :serving}

      {:restore, name} ->
        restored(tag, name, payload, state)

      {:release, ids, reason} ->
        released = if tag == :ok and is_map(payload), do: payload[:released] || 0, else: 0

        Telemetry.execute([:sidecar, :lease, :release], %{count: released}, %{
          pool: state.pool,
          slot: state.slot,
          os_pid: state.os_pid,
          leases: ids,
          reason: reason
        })

        state

      _ ->
        if tag == :error,
          do: Logger.warning("sidecar worker #{state.os_pid} reports: #{inspect(Error.from_term(payload))}")

        state
    end
  end

  defp handle_term({:telemetry, event, measurements, metadata}, state) when is_list(event) and is_map(metadata) do
    measurements =
      case measurements do
        %{duration: ns} -> %{measurements | duration: System.convert_time_unit(ns, :nanosecond, :native)}
        m -> m
      end

    Telemetry.execute(event, measurements, Map.merge(metadata, %{pool: state.pool, slot: state.slot}))
    state
  end

  defp handle_term(other, state) do
    Logger.warning("sidecar worker #{state.os_pid} sent an unexpected term: #{inspect(other, limit: 10)}")
    state
  end

  # What the pool loaded (Sidecar.Resources) is replayed before the worker is routable; a recipe
  # added meanwhile is loaded too (the recipes are looked at again once the loads are answered).
  # The start timeout still runs: a worker that does not restore in time is killed.
  defp restore(state) do
    {_version, recipes} = Manager.recipes(state.pool)

    case Enum.reject(recipes, &MapSet.member?(state.restored, &1.name)) do
      [] ->
        if state.start_timer, do: Process.cancel_timer(state.start_timer)

        if state.restoring_since do
          Telemetry.execute(
            [:sidecar, :resource, :restored],
            %{duration: System.monotonic_time() - state.restoring_since},
            %{pool: state.pool, slot: state.slot, os_pid: state.os_pid, resources: MapSet.to_list(state.restored)}
          )
        end

        serve(%{state | restoring_since: nil})

      missing ->
        state = %{state | status: :restoring, restoring_since: state.restoring_since || System.monotonic_time()}

        Enum.reduce(missing, state, fn r, st ->
          elem(internal(st, {:load, 0, r.name, r.loader, r.kwargs}, {:restore, r.name}), 1)
        end)
    end
  end

  defp restored(:ok, name, _info, state) do
    state = %{state | restored: MapSet.put(state.restored, name)}
    if Enum.any?(state.pending, &match?({_, {:restore, _}}, &1)), do: state, else: restore(state)
  end

  defp restored(:error, name, err, state) do
    err = Error.from_term(err)
    Logger.error("sidecar worker #{state.os_pid} could not restore resource #{name}: #{Exception.message(err)}; killing it")

    Telemetry.execute([:sidecar, :resource, :restore_failed], %{count: 1}, %{
      pool: state.pool,
      slot: state.slot,
      os_pid: state.os_pid,
      resource: name,
      error: err
    })

    kill(state)
    %{state | kill_reason: :restore_failed}
  end

  # Routable from now on: a slot's worker under :ready (and the manager counts it), a spare under
  # :spare (a slot's replacement takes it over). Health checks start.
  defp serve(state) do
    counter = :counters.new(1, [:write_concurrency])
    reg = state.cfg.registry
    info = state.info
    idempotent = info[:idempotent] || []
    # Every worker of a pool serves the same ops: the last one to be ready writes the same map.
    Registry.put_meta(reg, :ops, Map.new(info[:ops] || [], &{&1, &1 in idempotent}))
    key = if spare?(state), do: :spare, else: :ready
    {:ok, _} = Registry.register(reg, key, %{slot: state.slot, os_pid: state.os_pid, counter: counter})
    unless spare?(state), do: Manager.worker_ready(state.pool, state.slot, self(), state.os_pid)
    if state.cfg.health.interval_ms > 0, do: Process.send_after(self(), :health_tick, state.cfg.health.interval_ms)
    now = System.monotonic_time()
    measurements = %{startup: state.ready_at - state.spawned_at}
    measurements = if state.last_exit_at, do: Map.put(measurements, :since_exit, now - state.last_exit_at), else: measurements

    Telemetry.execute([:sidecar, :worker, :ready], measurements, %{
      pool: state.pool,
      slot: state.slot,
      os_pid: state.os_pid,
      device: info[:device],
      via: state.via,
      restart: state.crashes > 0
    })

    %{state | status: :ready, counter: counter}
  end

  # The share of one core a worker must have used during an unanswered health check to be busy
  # (the Python pool's sidecar.host.liveness.MIN_BUSY_CPU_SHARE).
  @min_busy_cpu_share 0.2

  defp cpu_now(%{os_pid: pid}) when is_integer(pid) do
    case OsProcess.cpu_seconds(pid) do
      {:ok, s} -> s
      :error -> nil
    end
  end

  defp cpu_now(_state), do: nil

  defp busy?(before, later, waited_ms) when is_number(before) and is_number(later) and waited_ms > 0,
    do: later - before >= @min_busy_cpu_share * waited_ms / 1000

  defp busy?(_before, _later, _waited_ms), do: false

  defp spare?(%{slot: {:spare, _}}), do: true
  defp spare?(_state), do: false

  # A replacement takes over a ready spare: its Port (and so its OS process) changes owner. The
  # spare's process then ends; its supervisor starts another spare.
  defp adopt_spare(%{cfg: %{spares: n}} = state) when n > 0 do
    case Registry.lookup(state.cfg.registry, :spare) do
      [] ->
        :none

      spares ->
        {pid, _} = Enum.random(spares)

        case GenServer.call(pid, {:handover, self()}, 5_000) do
          {:ok, taken} ->
            Manager.worker_spawned(state.pool, state.slot, self(), taken.os_pid)
            {:ok, serve(Map.merge(%{state | via: :spare}, taken))}

          :not_ready ->
            :none
        end
    end
  catch
    :exit, _ -> :none
  end

  defp adopt_spare(_state), do: :none

  defp reply(:ok, result, read, state) do
    state = %{state | served: true}

    case if(read == :zero_copy and is_map(result), do: zero_copy(result, state), else: {:ok, result, state}) do
      {:ok, result, state} -> {{:ok, result, state.os_pid}, state}
      {:error, err, state} -> {{:error, err}, state}
    end
  end

  defp reply(:error, err, _read, state), do: {{:error, Error.from_term(err)}, state}

  # -- exit ----------------------------------------------------------------------------------------

  defp exited(@launch_not_started, %{via: :fork, ready_at: nil} = state) do
    # The template could not fork it: nothing ran, no crash. Start cold now.
    Logger.warning("sidecar worker #{inspect(state.pool)}/#{state.slot}: the template could not start it; starting it cold")
    Template.launch_failed(state.pool)
    if state.start_timer, do: Process.cancel_timer(state.start_timer)
    if state.log, do: File.rm(state.log)
    {:noreply, open_port(%{state | port: nil, cold_only: true}, :cold)}
  end

  defp exited(status, state) do
    oom = status == 137 and state.oom_kills != nil and (Exit.oom_kills() || 0) > state.oom_kills
    info = Exit.classify(status, oom)
    info = if state.kill_reason, do: %{info | classification: state.kill_reason}, else: info
    tail = WorkerLog.tail(state.log, state.cfg.stderr_lines)
    state = %{state | os_pid: state.os_pid || forked_pid(state)}
    pid = state.os_pid || state.port_pid
    summary = WorkerLog.summarize(tail)

    err =
      Error.new(
        :worker_crashed,
        "sidecar worker #{pid} #{Exit.describe(info)}" <> if(summary, do: "; last output: #{summary}", else: ""),
        exit_code: info.exit_code,
        signal: info.signal,
        classification: info.classification,
        stderr_tail: tail,
        pid: pid
      )

    level = if info.classification == :clean, do: :info, else: :warning
    Logger.log(level, Exception.message(err) <> tail_text(tail))
    Registry.unregister(state.cfg.registry, :ready)
    caused = Exit.caused_by_work?(info)
    lived_ms = state.ready_at && System.convert_time_unit(System.monotonic_time() - state.ready_at, :native, :millisecond)
    healthy = state.served or (lived_ms != nil and lived_ms >= state.cfg.healthy_after_ms)
    phase = if state.ready_at && state.status != :restoring, do: :running, else: :start

    # Before the replies: a caller (and its handlers) sees the crash event, the dead worker's
    # segments gone and the manager knowing, before the caller has its error. A forked worker that
    # died before its ready term never told its pid: then the run's dead owners are swept.
    if state.os_pid, do: Shm.unlink_os_pid(state.os_pid), else: Shm.sweep_dead_owners(Shm.run_id())
    Manager.worker_exited(state.pool, state.slot, self(), %{error: err, caused: caused, phase: phase, healthy: healthy})
    crash_event(state, info, tail, caused)
    fail_pending(state, err)

    {:stop, {:shutdown, {:worker_exit, info.classification}}, %{state | port: nil, status: :exited}}
  end

  # A forked worker that died before its ready term: its pid from the launcher's line in its log.
  defp forked_pid(%{via: :fork, log: log}) when is_binary(log) do
    with {:ok, text} <- File.read(log),
         [_, pid] <- Regex.run(~r/^sidecar_launch: worker pid (\d+) forked/m, text) do
      String.to_integer(pid)
    else
      _ -> nil
    end
  end

  defp forked_pid(_state), do: nil

  defp crash_event(state, info, tail, caused) do
    Telemetry.execute([:sidecar, :pool, :crash], %{count: 1}, %{
      pool: state.pool,
      slot: state.slot,
      os_pid: state.os_pid || state.port_pid,
      classification: info.classification,
      exit_code: info.exit_code,
      signal: info.signal,
      stderr_tail: tail,
      caused: caused,
      phase: if(state.ready_at, do: :running, else: :start)
    })
  end

  defp tail_text([]), do: ""
  defp tail_text(lines), do: "; stderr:\n  " <> Enum.join(lines, "\n  ")

  defp fail_pending(state, err) do
    for {_id, {:call, from, _, _}} <- state.pending, do: GenServer.reply(from, {:error, err})
    for {id, {:stream, consumer, _, _}} <- state.pending, do: send(consumer, {:sidecar_stream_end, id, {:error, err}})
  end

  # SIGKILL for the worker; before a forked worker told its pid, SIGTERM to its launcher, which
  # passes it on as SIGKILL.
  defp kill(%{os_pid: pid}) when is_integer(pid), do: OsProcess.signal(pid, :kill)
  defp kill(%{port_pid: pid}) when is_integer(pid), do: OsProcess.signal(pid, :term)
  defp kill(_), do: :ok

  @impl true
  def terminate(reason, state) do
    if state.port do
      Registry.unregister(state.cfg.registry, :ready)
      fail_pending(state, Error.new(:cancelled, "the sidecar pool is shutting down (#{inspect(reason)})"))
      stop_process(state)
      if state.os_pid, do: Shm.unlink_os_pid(state.os_pid)
    end

    if state.log, do: File.rm(state.log)
    :ok
  end

  # SIGTERM: the worker finishes its calls and exits; its exit status is the notification. After
  # the grace period, SIGKILL.
  defp stop_process(%{port: port} = state) do
    if state.os_pid, do: OsProcess.signal(state.os_pid, :term), else: kill(state)

    receive do
      {^port, {:exit_status, _}} -> :ok
    after
      state.cfg.shutdown_grace_ms ->
        Logger.warning("sidecar worker #{state.os_pid} did not exit in #{state.cfg.shutdown_grace_ms} ms; sending SIGKILL")
        kill(state)

        receive do
          {^port, {:exit_status, _}} -> :ok
        after
          2_000 -> :ok
        end
    end
  end
end
